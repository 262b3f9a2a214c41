"""The core's plug-in points as a contributor uses them: a method in one new file, a loss plug-in that any
generator method accepts, CPU budgets declared on the config, a --help that fits a screen, and a resume
state sized by what it holds."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import NoArtifacts

import shards
import zoo
from synth.commands.cli import main
from synth.core import registry
from synth.methods.gmi import GMI, GMIConfig
from synth.runner import RunOptions, run

TINY_GMI = ["--batch-size", "8", "--inversion-steps", "2", "--kd-steps", "1", "--proxy-student", "resnet8",
            "--latent-dim", "16", "--generator-width", "8", "--memory-capacity", "64", "--device", "cpu",
            "--quiet", "--preset", "paper"]


@pytest.fixture
def temp_module(tmp_path, monkeypatch):
    """Writes a module into a temporary folder on sys.path and imports it; unregisters what it registered."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "METHODS", dict(registry.all_methods()))
    monkeypatch.setattr(registry, "PLUGINS", dict(registry.all_plugins()))

    def load(name: str, source: str):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    yield load


THROWAWAY_METHOD = '''
    from dataclasses import dataclass, field
    import torch
    from synth.core.protocol import SynthBatch, SynthConfig, SynthesisMethod

    @dataclass
    class NoiseConfig(SynthConfig):
        level: float = field(default=0.5, metadata={"help": "grey level of the images"})

    class Noise(SynthesisMethod):
        name = "throwaway-noise"
        summary = "grey images with noise (a test method)"
        config_class = NoiseConfig

        def synthesize(self):
            while True:
                labels = self.next_labels()
                shape = (len(labels), self.channels, self.height, self.width)
                images = (self.config.level + 0.1 * torch.randn(shape)).clamp(0, 1)
                self.batches_done += 1
                yield SynthBatch(images, labels)
'''


def test_a_method_is_one_new_file(temp_module, tmp_path, tiny_teacher):
    temp_module("throwaway_method", THROWAWAY_METHOD)
    assert "throwaway-noise" in CliRunner().invoke(main, ["list"]).output
    out = tmp_path / "set"
    result = CliRunner().invoke(main, ["run", "throwaway-noise", "--out", str(out), "--teacher", str(tiny_teacher),
                                       "--num-images", "8", "--batch-size", "8", "--level", "0.3", "--preset",
                                       "paper", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert shards.verify(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 8 and manifest["method"]["config"]["level"] == 0.3
    arrays = shards.load_arrays(out, progress=False)
    assert abs(arrays.images.mean() / 255 - 0.3) < 0.05  # its own images, not another method's


def test_a_method_without_a_cpu_budget_refuses_the_cpu_preset(temp_module, tmp_path, tiny_teacher):
    temp_module("throwaway_method", THROWAWAY_METHOD)
    result = CliRunner().invoke(main, ["run", "throwaway-noise", "--out", str(tmp_path / "x"), "--teacher",
                                       str(tiny_teacher), "--preset", "cpu"])
    assert result.exit_code == 2
    assert "declares no CPU budget" in result.output and "NoiseConfig.cpu_budget" in result.output
    assert not (tmp_path / "x").exists()


def test_a_cpu_budget_is_not_inherited(temp_module):
    module = temp_module("throwaway_sub", '''
        from dataclasses import dataclass, field
        from synth.methods.gmi import GMI, GMIConfig

        @dataclass
        class SubConfig(GMIConfig):
            stage_iterations: int = field(default=10_000, metadata={"help": "an expensive new stage"})

        class Sub(GMI):
            name = "throwaway-sub"
            summary = "gMI with an extra stage (a test method)"
            config_class = SubConfig
    ''')
    from synth.presets import PresetError, preset_values

    assert preset_values("cpu", GMI)[0] == GMIConfig.cpu_budget
    with pytest.raises(PresetError, match="declares no CPU budget"):
        preset_values("cpu", module.Sub)


def test_a_cpu_budget_naming_an_unknown_option_is_refused_at_definition(temp_module):
    with pytest.raises(TypeError, match="cpu_budget sets unknown option"):
        temp_module("throwaway_bad", '''
            from dataclasses import dataclass
            from typing import ClassVar
            from synth.methods.gmi import GMI, GMIConfig

            @dataclass
            class BadConfig(GMIConfig):
                cpu_budget: ClassVar[dict] = {"inversion_stepz": 3}

            class Bad(GMI):
                name = "throwaway-bad"
                summary = "typo in its budget"
                config_class = BadConfig
        ''')


TOY_PLUGIN = '''
    from dataclasses import dataclass, field
    import torch
    from synth.core.protocol import LossPlugin
    from synth.core.updates import term

    @dataclass
    class ToyOptions:
        toy_weight: float = field(default=0.0, metadata={"help": "weight of the toy feature critic (0: off)"})

    class ToyCritic(LossPlugin):
        """A linear critic on the teacher's features, trained to score features high; the generator is pushed
        to make features it scores high too. Its own parameters, optimiser and state."""
        name = "toy"
        summary = "a toy feature critic (a test plug-in)"
        options_class = ToyOptions

        @classmethod
        def enabled(cls, options):
            return options.toy_weight > 0

        def attach(self, host):
            super().attach(host)
            dim = host.teacher.features(torch.zeros(2, *host.teacher.input_shape)).shape[1]
            self.critic = torch.nn.Linear(dim, 1)
            self.optimizer = torch.optim.SGD(self.critic.parameters(), lr=0.1)
            self.steps = 0

        def losses(self, step):
            score = self.critic(step.teacher_features[0]).mean()
            return {"toy": term(-self.options.toy_weight * score, "generator", "latents")}

        def after_step(self, step):
            loss = -self.critic(step.teacher_features[0].detach()).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.steps += 1

        def state_dict(self):
            return {"critic": self.critic.state_dict(), "steps": self.steps}

        def load_state_dict(self, state):
            self.critic.load_state_dict(state["critic"])
            self.steps = int(state["steps"])
'''


def _shard_digests(out) -> list[str]:
    return [entry["sha256"] for entry in json.loads((out / "manifest.json").read_text())["shards"]]


@pytest.mark.parametrize("method", ["gmi", "d2cip"])
def test_a_loss_plugin_joins_any_generator_method_with_its_options_terms_updates_and_state(
        temp_module, tmp_path, tiny_teacher, method):
    extra = ["--prior-iterations", "2", "--bank-size", "16"] if method == "d2cip" else []
    plain = tmp_path / "plain"
    assert CliRunner().invoke(main, ["run", method, "--out", str(plain), "--teacher", str(tiny_teacher),
                                     "--num-images", "16", "--shard-size", "8", *TINY_GMI, *extra]).exit_code == 0
    module = temp_module("toy_plugin", TOY_PLUGIN)
    assert "--toy-weight" in CliRunner().invoke(main, ["run", method, "--help"]).output
    assert "--toy-weight" not in CliRunner().invoke(main, ["run", "deepinversion", "--help"]).output

    # Registered but not switched on: the same dataset, byte for byte, and the same identity.
    off = tmp_path / "off"
    assert CliRunner().invoke(main, ["run", method, "--out", str(off), "--teacher", str(tiny_teacher),
                                     "--num-images", "16", "--shard-size", "8", *TINY_GMI, *extra]).exit_code == 0
    assert _shard_digests(off) == _shard_digests(plain)
    identity = json.loads((off / "manifest.json").read_text())["identity"]
    assert identity == json.loads((plain / "manifest.json").read_text())["identity"]

    # Switched on, through the CLI: recorded in the manifest and the identity, and the shards change.
    on = tmp_path / "on"
    result = CliRunner().invoke(main, ["run", method, "--out", str(on), "--teacher", str(tiny_teacher),
                                       "--num-images", "16", "--shard-size", "8", "--toy-weight", "0.5",
                                       *TINY_GMI, *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((on / "manifest.json").read_text())
    assert manifest["method"]["plugins"] == {"toy": {"toy_weight": 0.5}}
    assert manifest["identity"]["plugins"] == {"toy": {"toy_weight": 0.5}}
    assert _shard_digests(on) != _shard_digests(plain)

    # In process: its term is in the loss dictionary, its parameters moved, its state round-trips.
    teacher = zoo.load_classifier(tiny_teacher)
    plugin = module.ToyCritic(module.ToyOptions(toy_weight=0.5))
    method_class = registry.get_method(method)
    config_values = dict(batch_size=8, inversion_steps=2, kd_steps=1, proxy_student="resnet8", latent_dim=16,
                         generator_width=8, memory_capacity=64)
    if method == "d2cip":
        config_values.update(prior_iterations=2, bank_size=16)
    host = method_class(teacher, method_class.config_class(**config_values), torch.device("cpu"), plugins=[plugin])
    critic_before = plugin.critic.weight.detach().clone()
    host.prepare(NoArtifacts())
    next(host.synthesize())
    assert "toy" in host.losses_of_last_step()
    assert plugin.steps == 2 and not torch.equal(plugin.critic.weight, critic_before)
    state = host.state_dict()["plugins"]["toy"]
    fresh = module.ToyCritic(module.ToyOptions(toy_weight=0.5))
    again = method_class(teacher, method_class.config_class(**config_values), torch.device("cpu"), plugins=[fresh])
    again.load_state_dict(host.state_dict())
    assert fresh.steps == 2 and torch.equal(fresh.critic.weight, plugin.critic.weight)
    assert state["steps"] == 2


def test_plugins_are_refused_by_methods_without_a_generator_objective(temp_module, tiny_teacher):
    module = temp_module("toy_plugin", TOY_PLUGIN)
    teacher = zoo.load_classifier(tiny_teacher)
    method = registry.get_method("deepinversion")
    with pytest.raises(ValueError, match="does not take loss plug-ins"):
        method(teacher, method.config_class(batch_size=8), torch.device("cpu"),
               plugins=[module.ToyCritic(module.ToyOptions(toy_weight=1.0))])


def test_run_help_is_a_screen_with_the_paper_not_the_derivation():
    text = CliRunner().invoke(main, ["run", "d2cip", "--help"]).output
    description = text.split("Options:")[0]
    assert "Paper: Dual Contrastive Inversion with Distributional Priors" in description
    assert "synth/methods/d2cip.py" in description
    assert "Readings where the paper is silent" not in text  # the module docstring stays in the module
    assert len(description.splitlines()) <= 20
    for option in ("--no-scr", "--no-zcr", "--no-cgmm", "--select-from", "--cycles", "--prior ", "[default: 0.8]"):
        assert option in text, option


def test_resume_state_is_sized_by_what_it_holds(tmp_path, tiny_teacher, monkeypatch):
    """After one 64-image shard the state holds 64 replayed images (uint8), the models and the optimiser:
    not the preallocated 8,192-image replay buffer (100 MB as float32 at 32x32)."""
    sizes = []
    commit = shards.ShardWriter.commit_shard

    def recording_commit(self, samples, state=None, **kwargs):
        commit(self, samples, state, **kwargs)
        if state is not None:
            sizes.append((self.out_dir / self.manifest["resume_state"]).stat().st_size)

    monkeypatch.setattr(shards.ShardWriter, "commit_shard", recording_commit)
    teacher = zoo.load_classifier(tiny_teacher)
    config = GMIConfig(batch_size=64, inversion_steps=1, kd_steps=1, proxy_student="resnet8", latent_dim=16,
                       generator_width=8)  # memory_capacity stays 8,192
    out = tmp_path / "set"
    run(GMI, config, teacher, RunOptions(out=out, num_images=128, shard_size=64, device="cpu", progress=False),
        log=lambda message: None)
    shard_bytes = json.loads((out / "manifest.json").read_text())["shards"][0]["bytes"]
    method = GMI(teacher, config, torch.device("cpu"))
    weights = sum(t.numel() * t.element_size() for module in (method.generator, method.student)
                  for t in module.state_dict().values())
    images = 64 * 3 * 32 * 32  # the replay memory after one shard, one byte per value
    assert images <= sizes[0] <= 2 * shard_bytes + 2 * weights + images + 100_000, (sizes[0], shard_bytes, weights)


def test_replay_memory_holds_the_stored_pixels(tiny_teacher):
    """The proxy student replays exactly the quantised pixels the shards store (what distill will see)."""
    teacher = zoo.load_classifier(tiny_teacher)
    method = GMI(teacher, GMIConfig(batch_size=8, inversion_steps=1, kd_steps=1, proxy_student="resnet8",
                                    latent_dim=16, generator_width=8, memory_capacity=64), torch.device("cpu"))
    batch = next(method.synthesize())
    held = method.memory.all()
    assert held.dtype == torch.uint8
    assert torch.equal(held, batch.images.clamp(0, 1).mul(255).round().to(torch.uint8))



def _doc_block(heading: str) -> str:
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split(heading, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_worked_example_in_the_architecture_doc_runs(temp_module, tmp_path, tiny_teacher):
    source = _doc_block("### Adding a method")
    module = temp_module("doc_example_method", source)
    out = tmp_path / "set"
    result = CliRunner().invoke(main, ["run", "gmi-tv", "--out", str(out), "--teacher", str(tiny_teacher),
                                       "--num-images", "8", "--tv-weight", "0.5", *TINY_GMI], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert shards.verify(out) == []
    teacher = zoo.load_classifier(tiny_teacher)
    method = module.GMITV(teacher, module.GMITVConfig(batch_size=8, inversion_steps=1, proxy_student="resnet8",
                                                      latent_dim=16, generator_width=8), torch.device("cpu"))
    next(method.synthesize())
    assert method.losses_of_last_step()["tv"] > 0
    assert method.engine.passes_run == 2  # tv reaches the latents it must not update: a second pass


def test_the_plugin_example_in_the_architecture_doc_runs(temp_module, tiny_teacher):
    source = "import torch\nfrom dataclasses import dataclass, field\nfrom synth.core.protocol import LossPlugin\n" \
             "from synth.core.updates import Term, term\n" + _doc_block("### Adding a loss plug-in")
    module = temp_module("doc_example_plugin", source)
    teacher = zoo.load_classifier(tiny_teacher)
    plugin = module.FeatureCritic(module.CriticOptions(critic_weight=0.3))
    method = GMI(teacher, GMIConfig(batch_size=8, inversion_steps=2, proxy_student="resnet8", latent_dim=16,
                                    generator_width=8), torch.device("cpu"), plugins=[plugin])
    before = plugin.critic.weight.detach().clone()
    next(method.synthesize())
    assert "critic" in method.losses_of_last_step()
    assert not torch.equal(plugin.critic.weight, before)


def test_methods_are_found_by_threads_asking_at_once_in_a_fresh_interpreter():
    """The benchmark's lanes are threads: none may see the registry half filled (7 of 8 did once)."""
    code = ("import threading\nfrom synth.core import registry\nerrors = []\n"
            "def ask():\n    try:\n        registry.get_method('gmi')\n    except ValueError as e:\n"
            "        errors.append(e)\n"
            "threads = [threading.Thread(target=ask) for _ in range(8)]\n"
            "[t.start() for t in threads]\n[t.join() for t in threads]\nprint(len(errors))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0"
