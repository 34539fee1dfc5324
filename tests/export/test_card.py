"""One verified export of a tiny fine-tuned model (with a Hub push recorded, no network) serves every test here."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from hf_modelopt.errors import UserError
from hf_modelopt.export.hub import PushRefusedError, plan_push, push_export
from hf_modelopt.files import sha256_file
from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import RecipeError, validate_recipe

from ..conftest import REPO, build_tiny_model, tiny_recipe, write_small_data

REPO_ID = "someone/tiny-bert-sst2"


class RecordingHubApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls and what the upload folder held."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = sorted(str(f.relative_to(folder).as_posix()) for f in folder.rglob("*") if f.is_file())
        texts = {name: (folder / name).read_text() for name in files if name.endswith((".json", ".yaml", ".md"))}
        self.calls.append(("upload_folder", repo_id, {**kwargs, "files": files, "texts": texts,
                                                      "card": (folder / "README.md").read_text()}))
        return "https://huggingface.co/commit/0"


@pytest.fixture(scope="module")
def verified_export(tmp_path_factory):
    """`hf-modelopt run` of a tiny BERT recipe whose export stage pushes to the (recorded) Hub."""
    import huggingface_hub

    root = tmp_path_factory.mktemp("export")
    model = build_tiny_model("bert", "text-classification", root / "bert")
    data = tiny_recipe(model, write_small_data(root / "data"))
    data["training"]["logging_steps"] = 1  # a loss curve to plot
    data["stages"][-1] = {"type": "export", "latency_repeats": 3, "push_to_hub": {"repo_id": REPO_ID}}
    RecordingHubApi.calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_MODELOPT_CACHE", str(root / "stage-cache"))
        patch.setattr(huggingface_hub, "HfApi", RecordingHubApi)
        patch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # for push_to_hub's preflight only
        run_recipe(validate_recipe(data), root / "out")
    return root / "out"


def card_table(text: str) -> dict[str, tuple[str, str]]:
    rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", text.split("## Results", 1)[1], re.M)
    return {label: (before, after) for label, before, after in rows}


def test_card_has_valid_metadata_and_before_after(verified_export):
    out = verified_export
    record = json.loads((out / "export.json").read_text())
    assert record["reload_check"]["passed"] and record["reload_check"]["max_abs_diff"] <= 1e-4
    card = ModelCard.load(out / "README.md")  # the YAML metadata parses
    assert card.data.tags == ["hf-modelopt", "finetune"]
    assert card.data.pipeline_tag == "text-classification" and card.data.library_name == "transformers"
    text = card.text
    assert "(stage `before`)" in text and "(stage `after`)" in text and "| accuracy |" in text
    # The recipe embedded in the card is the resolved one and parses.
    embedded = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(embedded)["task"] == "text-classification"

    # The before / after table shows the re-measured figures of export.json, and only those.
    table = card_table(text)
    after, figures = record["metrics"], record["figures"]
    assert table["accuracy"] == (f"{record['before']['metrics']['accuracy']:.4f}", f"{after['accuracy']:.4f}")
    assert table["parameters"][1] == f"{figures['export']['parameters']:,}" == "1,011,426"
    assert table["sparsity (exactly-zero Linear weights)"] == ("0.00%", "0.00%")
    latency = next(label for label in table if "latency" in label)
    assert latency == "CPU latency, batch 32 × 64 tokens (ms)" and table[latency][1] != "-"
    assert record["latency_setup"]["cpu"] in text and f"{record['latency_setup']['threads']} threads" in text

    # The loss curve of the finetune stage is in the folder and linked from the card.
    assert record["plots"] == [{"path": "plots/finetune-loss.png", "title": "training losses of stage finetune"}]
    assert (out / "plots" / "finetune-loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "](plots/finetune-loss.png)" in text

    # The manifest is the folder: every file but export.json, the stage folders and the run's marker and lock,
    # each with its size and sha256.
    listed = {str(f.relative_to(out).as_posix()) for f in out.rglob("*")
              if f.is_file() and f.parts[len(out.parts)] != "stages"} - {"export.json"}
    assert set(record["files"]) == {name for name in listed if not name.startswith(".hf-modelopt")}
    assert all(record["files"][name] == {"size": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
               for name in record["files"])


def test_card_loading_code_works_and_remeasures_to_the_card(verified_export):
    """The card's code, run as is in a fresh process, loads a model whose metrics are the card's."""
    out = verified_export
    code = ModelCard.load(out / "README.md").text.split("```python\n", 1)[1].split("```", 1)[0]
    measure = ("\nimport json, sys\nfrom hf_modelopt.metrics import evaluate_model\nfrom hf_modelopt.recipe import "
               "load_recipe\nrecipe = load_recipe(sys.argv[1])\n"
               "print(json.dumps(evaluate_model(model, tokenizer, recipe.data, task=recipe.task)))\n")
    # (run from the export folder: its recipe.yaml names the data relative to the export)
    run = subprocess.run([sys.executable, "-c", code + measure, "recipe.yaml"], capture_output=True,
                         text=True, cwd=out, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == json.loads((out / "export.json").read_text())["metrics"]


def test_push_plan_is_the_manifest_and_a_card_naming_the_repo(verified_export):
    plan = plan_push(verified_export, "org/name", private=True)
    record = json.loads((verified_export / "export.json").read_text())
    assert plan.files == sorted([*record["files"], "export.json"])
    assert "model.safetensors" in plan.files and not any(f.startswith("stages/") for f in plan.files)
    local = (verified_export / "README.md").read_text()
    assert plan.card == local.replace(json.dumps(str(verified_export)), '"org/name"')
    assert 'from_pretrained("org/name")' in plan.card
    assert ModelCard(plan.card).data.tags == ["hf-modelopt", "finetune"]


def test_push_to_hub_option_uploaded_exactly_the_plan(verified_export):
    (create, repo_id, create_args), (upload, upload_repo, upload_args) = RecordingHubApi.calls
    assert (create, repo_id, create_args["private"], create_args["exist_ok"]) == ("create_repo", REPO_ID, False, True)
    plan = plan_push(verified_export, REPO_ID)
    assert (upload, upload_repo) == ("upload_folder", REPO_ID)
    assert upload_args["files"] == plan.files and upload_args["card"] == plan.card
    assert upload_args["delete_patterns"] == "*"  # the repository ends up holding exactly the export
    # No uploaded file names a local path of this machine (base model, data, the export folder).
    root = str(verified_export.parent)
    assert not [name for name, text in upload_args["texts"].items() if root in text]


def test_push_refuses_unverified_or_changed_exports(verified_export, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(verified_export, copy, ignore=shutil.ignore_patterns("stages"))
    record = json.loads((copy / "export.json").read_text())
    (copy / "export.json").write_text(json.dumps({**record, "reload_check": {"passed": False, "skipped": True}}))
    with pytest.raises(PushRefusedError, match="reload check was skipped"):
        push_export(copy, "org/name", api=RecordingHubApi())
    (copy / "export.json").write_text(json.dumps(record))
    with (copy / "model.safetensors").open("ab") as weights:
        weights.write(b"\0")
    with pytest.raises(PushRefusedError, match="model.safetensors changed since the export"):
        plan_push(copy, "org/name")
    with (copy / "model.safetensors").open("r+b") as weights:  # the same size, other bytes: the hash tells
        weights.truncate(record["files"]["model.safetensors"]["size"])
        weights.seek(1000)
        weights.write(b"\xff" * 8)
    with pytest.raises(PushRefusedError, match="model.safetensors changed since the export.*sha256 differs"):
        plan_push(copy, "org/name")
    (copy / "export.json").unlink()
    with pytest.raises(PushRefusedError, match="not a finished hf-modelopt export"):
        plan_push(copy, "org/name")


def test_cli_push_dry_run_and_refusal(verified_export, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hf_modelopt.cli", *map(str, args)], capture_output=True,
                              text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    dry = cli("push", verified_export, "--repo-id", "org/name", "--private", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "would upload to org/name (private)" in dry.stdout and "  model.safetensors" in dry.stdout
    assert 'from_pretrained("org/name")' in dry.stdout
    refused = cli("push", tmp_path, "--repo-id", "org/name")
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "no export.json" in refused.stderr


def test_push_to_hub_offline_fails_before_any_work(tiny_models, sst2_files, tmp_path):
    data = tiny_recipe(tiny_models("bert"), sst2_files)
    data["stages"][-1] = {"type": "export", "push_to_hub": {"repo_id": "org/name"}}
    with pytest.raises(RecipeError) as info:
        run_recipe(validate_recipe(data, "r.yaml"), tmp_path / "out")  # conftest: HF_HUB_OFFLINE=1
    assert info.value.key == "stages[3].push_to_hub" and "offline" in info.value.message
    assert not (tmp_path / "out").exists()
    data["stages"][-1]["push_to_hub"]["repo_id"] = "not a repo id"
    with pytest.raises(RecipeError, match="repo_id: not a valid Hub repository id"):
        validate_recipe(data, "r.yaml")


def test_push_uploads_only_listed_regular_files_inside_the_folder(verified_export, tmp_path, monkeypatch):
    """Case 6 of issue 28: a symlink to a secret, listed or not, and a listed path leaving the folder."""
    import shutil

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the recorded Hub stands in

    secret = tmp_path / "secret"
    secret.write_text("hf_secret_token")
    copy = tmp_path / "exports" / "copy"
    shutil.copytree(verified_export, copy, ignore=shutil.ignore_patterns("stages"))
    (copy / "notes.txt").symlink_to(secret)  # present, not listed: skipped (never uploaded)
    plan = plan_push(copy, "org/name")
    assert "notes.txt" not in plan.files
    RecordingHubApi.calls = []
    push_export(copy, "org/name", api=RecordingHubApi())
    uploaded = RecordingHubApi.calls[-1][2]
    assert "notes.txt" not in uploaded["files"] and not any("hf_secret_token" in t for t in uploaded["texts"].values())

    record = json.loads((copy / "export.json").read_text())
    listed = {**record, "files": {**record["files"], "notes.txt": {"size": 15, "sha256": sha256_file(secret)}}}
    (copy / "export.json").write_text(json.dumps(listed))
    with pytest.raises(PushRefusedError, match="notes.txt is a symlink; push never follows symlinks"):
        plan_push(copy, "org/name")
    escaping = {**record, "files": {**record["files"], "../../secret": {"size": 15, "sha256": sha256_file(secret)}}}
    (copy / "export.json").write_text(json.dumps(escaping))
    with pytest.raises(PushRefusedError, match="lists '../../secret', which is outside the folder"):
        plan_push(copy, "org/name")
    older = {**record, "files": {name: entry["size"] for name, entry in record["files"].items()}}
    (copy / "export.json").write_text(json.dumps(older))
    with pytest.raises(PushRefusedError, match="records no sha256 for its files"):
        plan_push(copy, "org/name")
    (copy / "export.json").write_text(json.dumps(record))
    (copy / "recipe.yaml").write_text((copy / "recipe.yaml").read_text() + f"# {copy}\n")
    listed = {**record, "files": {**record["files"], "recipe.yaml": {"size": (copy / "recipe.yaml").stat().st_size,
                                                                     "sha256": sha256_file(copy / "recipe.yaml")}}}
    (copy / "export.json").write_text(json.dumps(listed))
    with pytest.raises(PushRefusedError, match=f"(README.md|recipe.yaml) contains the local path {copy}"):  # (the card
        # embeds the recipe)
        push_export(copy, "org/name", api=RecordingHubApi())


def test_push_offline_is_one_line(verified_export, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="push to org/name: the Hub is offline"):
        push_export(verified_export, "org/name")
    cli = subprocess.run([sys.executable, "-m", "hf_modelopt.cli", "push", str(verified_export), "--repo-id",
                          "org/name"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr[-3000:]
    assert [line for line in cli.stderr.splitlines() if line.startswith("error:")] == [
        "error: push to org/name: the Hub is offline (HF_HUB_OFFLINE=1, set by you or because huggingface.co was "
        "unreachable); go online, then push again"]


def test_push_to_an_unreachable_hub_is_one_line(verified_export, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    class UnreachableHub(RecordingHubApi):
        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("[Errno 111] Connection refused")

    with pytest.raises(UserError, match="push to org/name failed: ConnectionError: \\[Errno 111\\] Connection"):
        push_export(verified_export, "org/name", api=UnreachableHub())
