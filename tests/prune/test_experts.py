"""Mixture-of-experts pruning: every expert's matrix of the fused 3-D parameters is pruned as its own matrix (one-shot:
calibrated on the tokens routed to that expert), the routers stay dense, reports count every block parameter, and
the pruned model reloads with its logits."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

from hf_modelopt.formats.experts import expert_matrices, experts_modules, router_names
from hf_modelopt.prune import OneShotPruningConfig, PruningCallback, PruningConfig, ScheduleConfig, prune_

MOE_CONFIGS = {
    "mixtral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                      num_experts_per_tok=2),
}
VOCAB = 128


def _moe(model_type):
    config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, **MOE_CONFIGS[model_type])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _batches(count=2):
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 16), generator=generator),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(count)]


def _fused_expert_weights(model):
    return {f"{name}.{param_name}": param for name, experts in experts_modules(model).items()
            for param_name, param in experts.named_parameters(recurse=False) if param.dim() == 3}


def _routers(model):
    return {name: model.get_submodule(name).weight.detach().clone() for name in router_names(model)}


@pytest.mark.parametrize("model_type", list(MOE_CONFIGS))
@pytest.mark.parametrize("config", [PruningConfig(sparsity=0.5), OneShotPruningConfig(method="wanda"),
                                    OneShotPruningConfig(method="sparsegpt")], ids=["gradual", "wanda", "sparsegpt"])
def test_pruning_reaches_every_expert_and_leaves_the_routers_dense(model_type, config):
    model = _moe(model_type)
    routers = _routers(model)
    assert routers and len(_fused_expert_weights(model)) == 4  # gate_up_proj and down_proj in each of 2 blocks
    report = prune_(model, config, _batches())

    for name, param in _fused_expert_weights(model).items():  # every fused expert weight at 50 % ± 1 %
        assert float((param == 0).float().mean()) == pytest.approx(0.5, abs=0.01), name
        for expert in range(param.shape[0]):  # and each expert's matrix on its own
            assert float((param[expert] == 0).float().mean()) == pytest.approx(0.5, abs=0.02), (name, expert)
    for name, weight in routers.items():
        assert torch.equal(model.get_submodule(name).weight, weight), f"router {name} changed"
    assert sorted(report["routers_kept_dense"]) == sorted(routers)
    block_params = [p for p in model.model.layers.parameters()]
    assert report["block_parameters"] == sum(p.numel() for p in block_params)
    zeros = sum(int((p == 0).sum()) for p in block_params)
    assert report["block_sparsity"] == pytest.approx(zeros / report["block_parameters"])
    # the experts are most of the block: the block's zeros show they were pruned (norms and routers are not)
    assert report["block_sparsity"] > 0.45


@torch.no_grad()
def test_oneshot_calibrates_each_expert_on_the_tokens_routed_to_it():
    """Block 0 of mixtral: Wanda's masks of each expert equal those computed from the tokens its router sends it
    (reference written here from the router's own top-k), and differ from masks computed from all tokens."""
    model = _moe("mixtral")
    moe = model.model.layers[0].mlp
    batches = _batches()
    seen = []
    handle = moe.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    for batch in batches:
        model(**batch)
    handle.remove()
    hidden = torch.cat(seen)
    _, _, top_k = moe.gate(hidden)
    experts = moe.experts
    gate_up, down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()

    def wanda_keep(weight, x):
        score = weight.abs() * torch.sqrt((x.float() ** 2).mean(0)).unsqueeze(0)
        drop = torch.argsort(score, dim=1)[:, : weight.shape[1] // 2]
        return torch.ones_like(weight, dtype=torch.bool).scatter_(1, drop, False)

    def keeps(e, x):
        gate, up = (x @ gate_up[e].T).chunk(2, dim=-1)
        return wanda_keep(gate_up[e], x), wanda_keep(down[e], experts.act_fn(gate) * up)

    expected = {e: keeps(e, hidden[(top_k == e).any(-1)]) for e in range(experts.num_experts)}
    all_tokens = {e: keeps(e, hidden) for e in range(experts.num_experts)}
    prune_(model, OneShotPruningConfig(method="wanda"), batches)
    differs = False
    for e, (gate_up_keep, down_keep) in expected.items():
        assert torch.equal(experts.gate_up_proj[e] != 0, gate_up_keep), f"expert {e} gate_up_proj"
        assert torch.equal(experts.down_proj[e] != 0, down_keep), f"expert {e} down_proj"
        differs |= not torch.equal(gate_up_keep, all_tokens[e][0]) or not torch.equal(down_keep, all_tokens[e][1])
    assert differs, "routing made no difference to the masks: the test does not tell per-expert calibration apart"


def test_expert_matrices_are_views_of_the_fused_parameters():
    experts = _moe("qwen3_moe").model.layers[0].mlp.experts
    parts = expert_matrices(experts)
    assert sorted(parts) == sorted(f"{p}.{e}" for p in ("gate_up_proj", "down_proj") for e in range(4))
    with torch.no_grad():
        parts["down_proj.2"].weight.zero_()
    assert (experts.down_proj[2] == 0).all() and (experts.down_proj[1] != 0).any()
    assert parts["gate_up_proj.0"].out_in().shape == (64, 32)  # (2 x moe_intermediate, hidden) as Linear holds it


class _RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        self.ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


@pytest.mark.parametrize("model_type,method", [("mixtral", "magnitude"), ("qwen2_moe", "magnitude"),
                                               ("qwen3_moe", "movement")])
def test_pruning_callback_prunes_the_experts_while_training(model_type, method, tmp_path):
    model = _moe(model_type)
    model.train()
    routers = _routers(model)
    config = PruningConfig(sparsity=0.5, method=method, schedule=ScheduleConfig(end_step=2, update_every=1))
    callback = PruningCallback(config)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4,
                                          max_steps=3, learning_rate=1e-2, save_strategy="no", disable_tqdm=True,
                                          dataloader_pin_memory=False, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_RandomTokens(), callbacks=[callback])
    trainer.train()
    assert any(".experts.gate_up_proj." in name for name in callback.modules)
    for name, param in _fused_expert_weights(model).items():  # still exactly pruned after the optimizer steps
        assert float((param == 0).float().mean()) == pytest.approx(0.5, abs=0.01), name
    assert not any(name in routers for name in callback.modules)
    logged = [entry for entry in trainer.state.log_history if "block_sparsity" in entry]
    assert logged and logged[-1]["block_sparsity"] > 0.45


RELOAD = """
import json, sys, torch
{imports}
import transformers
out = {{}}
for folder, ids in json.loads(sys.argv[1]).items():
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out[folder] = model(torch.tensor(ids)).logits.tolist()
print(json.dumps(out))
"""


def _reload_in_fresh_process(folders: dict, imports: str) -> dict:
    run = subprocess.run([sys.executable, "-c", RELOAD.format(imports=imports), json.dumps(folders)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return {folder: torch.tensor(logits) for folder, logits in json.loads(run.stdout.splitlines()[-1]).items()}


def test_pruned_moe_models_reload_with_their_logits(tmp_path):
    """save_pretrained loads in plain transformers (no hf_modelopt imported); the compressed sparse and quantized
    storage formats load after `import hf_modelopt` (they used to fail in transformers' per-expert merge with
    `Concatenate on tensors destined for ...experts.gate_up_proj`)."""
    from hf_modelopt import save_compressed
    from hf_modelopt.formats import compressed_tensors
    from hf_modelopt.quant.config import StorageQuantizationConfig

    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2)).tolist()
    plain, formats, expected, reports = {}, {}, {}, {}
    for model_type in MOE_CONFIGS:
        model = _moe(model_type)
        prune_(model, OneShotPruningConfig(method="wanda"), _batches())
        with torch.no_grad():
            expected[model_type] = model(torch.tensor(ids)).logits
        model.save_pretrained(tmp_path / model_type / "plain")
        assert save_compressed(model, tmp_path / model_type / "sparse", sparse=True).loads_with == "hf_modelopt"
        # compressed-tensors would write a folder transformers cannot reload: the export writes hf-modelopt's format
        assert "mixture-of-experts" in compressed_tensors.blocker(model)
        storage = StorageQuantizationConfig(group_size=32)
        assert save_compressed(model, tmp_path / model_type / "storage", storage=storage).loads_with == "hf_modelopt"
        from hf_modelopt.formats.groupwise import storage_state_dict

        reports[model_type] = storage_state_dict(model, group_size=32)[1]
        plain[str(tmp_path / model_type / "plain")] = ids
        formats.update({str(tmp_path / model_type / kind): ids for kind in ("sparse", "storage")})
    loaded = _reload_in_fresh_process(plain, "")
    loaded.update(_reload_in_fresh_process(formats, "import hf_modelopt"))
    for model_type, logits in expected.items():
        for kind in ("plain", "sparse"):
            assert torch.allclose(loaded[str(tmp_path / model_type / kind)], logits, atol=1e-5), (model_type, kind)
        # int8 storage of the attention and embeddings: close, not equal
        assert torch.allclose(loaded[str(tmp_path / model_type / "storage")], logits, atol=0.05), model_type
        # the experts are stored in full precision, and the storage report says so
        assert sum(".experts." in name for name in reports[model_type].kept) == 4, reports[model_type].kept


MASKED_RELOAD = """
import json, sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert "hf_modelopt" not in sys.modules
with torch.no_grad():
    print(json.dumps(model(torch.tensor(json.loads(sys.argv[2]))).logits.tolist()))
"""


@torch.no_grad()
def _logits_with_router_logits_masked(model, ids, removed: dict):
    """The original model's logits with the removed experts' router logits set to -inf (the routers compute their
    logits with F.linear on their weight; that call is intercepted)."""
    from unittest import mock

    real_linear = torch.nn.functional.linear
    masks = {id(model.get_submodule(name).weight): experts for name, experts in removed.items()}

    def linear(x, weight, bias=None):
        out = real_linear(x, weight, bias)
        if id(weight) in masks:
            out = out.clone()
            out[..., masks[id(weight)]] = float("-inf")
        return out

    with mock.patch.object(torch.nn.functional, "linear", linear):
        return model(ids).logits


@pytest.mark.parametrize("model_type", list(MOE_CONFIGS))
def test_expert_removal_equals_the_router_never_choosing_the_removed_experts(model_type, tmp_path):
    from hf_modelopt.prune import ExpertRemovalConfig
    from hf_modelopt.prune.experts import moe_blocks

    model = _moe(model_type)
    original = _moe(model_type)
    routers = {name: next(n for n, m in model.named_modules() if m is router)
               for name, (_, router) in moe_blocks(model).items()}
    report = prune_(model, ExpertRemovalConfig(experts=2), _batches())
    assert all(len(kept) == 2 for kept in report["kept_experts"].values())
    assert report["parameters_after"] < report["parameters_before"]
    for name, scores in report["scores"].items():  # the two kept are the two best scored
        assert sorted(scores, reverse=True)[:2] == sorted((scores[i] for i in report["kept_experts"][name]),
                                                          reverse=True)
    removed = {routers[name]: [e for e in range(4) if e not in kept] for name, kept in report["kept_experts"].items()}
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    expected = _logits_with_router_logits_masked(original, ids, removed)
    assert not torch.allclose(expected, original(ids).logits, atol=1e-3)  # the removal changes the model

    model.save_pretrained(tmp_path / "removed")
    run = subprocess.run([sys.executable, "-c", MASKED_RELOAD, str(tmp_path / "removed"), json.dumps(ids.tolist())],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    reloaded = torch.tensor(json.loads(run.stdout.splitlines()[-1]))
    assert (reloaded - expected).abs().max() < 1e-5
    config = json.loads((tmp_path / "removed" / "config.json").read_text())
    assert config.get("num_local_experts", config.get("num_experts")) == 2


def test_expert_removal_refuses_before_changing_anything():
    from hf_modelopt.prune import ExpertRemovalConfig

    model = _moe("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="at least the 2 chosen per token"):
        prune_(model, ExpertRemovalConfig(experts=1), _batches())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.config.num_local_experts == 4
