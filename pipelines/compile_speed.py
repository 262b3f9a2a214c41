"""Does ``torch.compile`` pay on top of bf16 autocast? The teacher's forward and backward to its input (what every
inversion step runs), eager against compiled, side by side in one process (issue 19).

    python -m pipelines.speed compile [--batch-size 64] [--iterations 20] [--rounds 2] [--precision bf16]

The shipped WRN-16-2 teacher, a batch of random images that require a gradient, ``--precision`` autocast (the
same ``zoo.Acceleration`` the commands use). Compilation is timed on its own (the first calls, until the
compiled graph runs), then eager and compiled alternate per round so that load falls on both alike. Printed:
the compile seconds, images/s of each, and the break-even: how many seconds of synthesis the compiled teacher
must run before its compilation has paid for itself (the demo synthesises for 360 s).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import zoo


def _rate(step, images: torch.Tensor, iterations: int) -> float:
    started = time.perf_counter()
    for _ in range(iterations):
        step(images)
    return iterations * images.shape[0] / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    teacher = zoo.load_classifier(zoo.default_teacher_path()).eval().requires_grad_(False)
    acceleration = zoo.Acceleration(torch.device("cpu"), precision=args.precision)
    compiled = torch.compile(teacher)
    images = torch.rand(args.batch_size, *teacher.input_shape)

    def step_with(model):
        def step(x: torch.Tensor) -> None:
            x = x.clone().requires_grad_(True)
            with acceleration.autocast():
                loss = model(x).float().logsumexp(dim=1).mean()
            loss.backward()
        return step

    eager_step, compiled_step = step_with(teacher), step_with(compiled)
    started = time.perf_counter()
    compiled_step(images)
    compiled_step(images)  # the backward graph compiles on the first call too; the second runs it once warm
    compile_seconds = time.perf_counter() - started
    eager_step(images)  # oneDNN's first call sets up its kernels: not counted either side
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        order = [("eager", eager_step), ("compiled", compiled_step)]
        for name, step in order if r % 2 == 0 else order[::-1]:
            rates[name].append(_rate(step, images, args.iterations))
            print(f"round {r} {name:8s}: {rates[name][-1]:.0f} images/s", flush=True)
    eager, fast = statistics.median(rates["eager"]), statistics.median(rates["compiled"])
    print(f"precision {args.precision}, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"compile: {compile_seconds:.1f} s; eager {eager:.0f} images/s, compiled {fast:.0f} ({fast / eager:.2f}x)")
    if fast > eager:
        # seconds s of eager teacher work at which compiled work + compile time equals it: s = c / (1 - e/f)
        print(f"break-even after {compile_seconds / (1 - eager / fast):.0f} s of teacher time")
    else:
        print("compiled is not faster: never pays")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
