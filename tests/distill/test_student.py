import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_modelopt.distill.student import student_from_teacher, transformer_layers

from ..conftest import CAUSAL_LMS, CLASSIFIERS, TINY_CONFIGS


def deeper(model_type):
    """Tiny configs with 4 layers, so there is something to drop."""
    kwargs = dict(TINY_CONFIGS[model_type])
    for key in ("num_hidden_layers", "n_layers", "n_layer"):
        if key in kwargs:
            kwargs[key] = 4
    return kwargs


@pytest.mark.parametrize("model_type", CLASSIFIERS + CAUSAL_LMS)
def test_student_keeps_chosen_layers_with_copied_weights(model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=300, **deeper(model_type))
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if model_type in CAUSAL_LMS else AutoModelForSequenceClassification
    teacher = auto.from_config(config).eval()
    student, chosen = student_from_teacher(teacher, layers=[0, 3])
    assert chosen == [0, 3] and student.config.num_hidden_layers == 2
    _, teacher_layers = transformer_layers(teacher)
    _, student_layers = transformer_layers(student)
    for s, t in ((0, 0), (1, 3)):
        for (name, a), (_, b) in zip(student_layers[s].state_dict().items(), teacher_layers[t].state_dict().items()):
            assert torch.equal(a, b), name
    # Everything outside the layers (embeddings, final norm, head) is the teacher's.
    prefix, _ = transformer_layers(teacher)
    outside = [k for k in student.state_dict() if not k.startswith(prefix + ".")]
    assert len(outside) >= 2
    assert all(torch.equal(student.state_dict()[k], teacher.state_dict()[k]) for k in outside)
    ids = torch.randint(5, 300, (2, 7))
    assert student(input_ids=ids).logits.shape == teacher(input_ids=ids).logits.shape


def test_keeping_every_layer_reproduces_the_teacher():
    from transformers import AutoConfig

    config = AutoConfig.for_model("bert", vocab_size=300, **deeper("bert"))
    teacher = AutoModelForSequenceClassification.from_config(config).eval()
    student, _ = student_from_teacher(teacher, every=1)
    ids = torch.randint(5, 300, (2, 7))
    assert torch.allclose(student.eval()(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_every_and_bad_layers():
    from transformers import AutoConfig

    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=300, **deeper("llama")))
    assert student_from_teacher(teacher, every=2)[1] == [0, 2]
    with pytest.raises(ValueError, match="out of range"):
        student_from_teacher(teacher, layers=[0, 4])


def _tiny(model_type, task, **overrides):
    import transformers

    from ..conftest import TASK_AUTO_CLASSES

    config = transformers.AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    if model_type != "vit":
        config.vocab_size = 300
    torch.manual_seed(0)
    return getattr(transformers, TASK_AUTO_CLASSES[task]).from_config(config).eval()


STACKS = {"bert": ["bert.encoder.layer"], "roberta": ["roberta.encoder.layer"],
          "distilbert": ["distilbert.transformer.layer"], "deberta-v2": ["deberta.encoder.layer"],
          "electra": ["electra.encoder.layer"], "xlm-roberta": ["roberta.encoder.layer"],
          "gpt2": ["transformer.h"], "opt": ["model.decoder.layers"], "gpt_neox": ["gpt_neox.layers"],
          "phi": ["model.layers"], "mistral": ["model.layers"], "llama": ["model.layers"], "qwen2": ["model.layers"],
          "qwen3": ["model.layers"], "t5": ["encoder.block", "decoder.block"],
          "bart": ["model.encoder.layers", "model.decoder.layers"], "vit": ["vit.layers"]}


def test_layer_stacks_of_every_family():
    from hf_modelopt.distill.student import layer_stacks

    from ..conftest import ARCHITECTURES, CAUSAL_LMS, DECODERS, ENCODER_DECODERS, VISION

    assert set(STACKS) == set(ARCHITECTURES)
    for model_type in ARCHITECTURES:
        task = ("causal-lm" if model_type in DECODERS + CAUSAL_LMS else "seq2seq" if model_type in ENCODER_DECODERS
                else "image-classification" if model_type in VISION else "text-classification")
        stacks = layer_stacks(_tiny(model_type, task, **({"num_decoder_layers": 3} if model_type == "t5" else {})))
        assert [s.path for s in stacks] == STACKS[model_type], model_type
        if model_type in ENCODER_DECODERS:
            assert [s.is_decoder for s in stacks] == [False, True]
            with pytest.raises(ValueError, match="use hf_modelopt.distill.student.layer_stacks"):
                transformer_layers(_tiny(model_type, task))


def test_layer_count_in_text_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from hf_modelopt.distill.student import layer_stacks

    text = LlamaConfig(vocab_size=300, **{**TINY_CONFIGS["llama"], "num_hidden_layers": 3})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_id=299))
    found = {s.path: (s.config_name, s.count_key, len(s.layers)) for s in layer_stacks(model)}
    assert found["model.language_model.layers"] == ("text_config", "num_hidden_layers", 3)
    assert found["model.vision_tower.encoder.layers"] == ("vision_config", "num_hidden_layers", 2)


def _same_block(student_block, teacher_block):
    teacher_state = teacher_block.state_dict()
    for name, value in student_block.state_dict().items():
        if name.endswith("relative_attention_bias.weight") and name not in teacher_state:
            continue  # T5: the student's first block carries the stack's bias, checked on its own
        assert torch.equal(value, teacher_state[name]), name


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_encoder_decoder_student_keeps_encoder_and_decoder_layers_separately(model_type):
    from hf_modelopt.distill.student import layer_stacks

    counts = {"t5": dict(num_layers=4, num_decoder_layers=3), "bart": dict(encoder_layers=4, decoder_layers=3)}
    teacher = _tiny(model_type, "seq2seq", **counts[model_type])
    student, chosen = student_from_teacher(teacher, layers=[1, 2], decoder_layers=[2])
    assert chosen == [1, 2]
    encoder, decoder = layer_stacks(student)
    assert len(encoder.layers) == 2 and len(decoder.layers) == 1
    teacher_encoder, teacher_decoder = layer_stacks(teacher)
    if model_type == "t5":
        assert (student.config.num_layers, student.config.num_decoder_layers) == (2, 1)
        # The student's first blocks hold the relative attention bias, which only teacher block 0 had.
        for stack, teacher_stack in ((encoder, teacher_encoder), (decoder, teacher_decoder)):
            bias = stack.layers[0].layer[0].SelfAttention.relative_attention_bias.weight
            assert torch.equal(bias, teacher_stack.layers[0].layer[0].SelfAttention.relative_attention_bias.weight)
            assert not stack.layers[-1].layer[0].SelfAttention.has_relative_attention_bias or len(stack.layers) == 1
    else:
        assert (student.config.encoder_layers, student.config.decoder_layers) == (2, 1)
    for s, t in ((0, 1), (1, 2)):
        _same_block(encoder.layers[s], teacher_encoder.layers[t])
    _same_block(decoder.layers[0], teacher_decoder.layers[2])
    ids = torch.randint(5, 300, (2, 7))
    labels = torch.randint(5, 300, (2, 5))
    assert student(input_ids=ids, labels=labels).logits.shape == teacher(input_ids=ids, labels=labels).logits.shape
    with pytest.raises(ValueError, match="decoder_layers"):
        student_from_teacher(teacher, layers=[0, 3])  # fits the encoder (4 layers), not the decoder (3)


@pytest.mark.parametrize("model_type,task", [("t5", "seq2seq"), ("bart", "seq2seq"), ("vit", "image-classification")])
def test_keeping_every_layer_reproduces_an_encoder_decoder_or_vit_teacher(model_type, task):
    teacher = _tiny(model_type, task)
    student, _ = student_from_teacher(teacher, every=1)
    if model_type == "vit":
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
        small, kept = student_from_teacher(teacher, layers=[1])
        assert kept == [1] and small.config.num_hidden_layers == 1
        _same_block(small.vit.layers[0], teacher.vit.layers[1])
        assert small(**inputs).logits.shape == (2, 2)
    else:
        inputs = {"input_ids": torch.randint(5, 300, (2, 7)), "labels": torch.randint(5, 300, (2, 5))}
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(**inputs).logits, teacher(**inputs).logits, rtol=0, atol=0)
