import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from hf_modelopt.benchmark import folder_candidate, peak_memory_mb


def test_peak_memory_grows_with_the_model(tmp_path):
    folders = {}
    for name, hidden in (("small", 32), ("large", 512)):
        config = AutoConfig.for_model("bert", hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=2 * hidden, vocab_size=30522)
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / name)
        folders[name] = peak_memory_mb(folder_candidate(tmp_path / name, "text-classification"),
                                       "text-classification", batch_size=8, seq_len=32)
    # the large model's weights alone are 4 bytes × 18.8 M parameters = 75 MB more than the small one's
    assert folders["large"] - folders["small"] > 60, folders
