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
