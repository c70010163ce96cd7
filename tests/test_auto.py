"""AutoPeftModel*: the base model named in adapter_config.json plus the adapter, compared with peft's auto classes."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import lorakit
from models import tiny_bert_cls, tiny_llama

IDS = torch.tensor([[1, 5, 9, 13, 2, 7]])


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    """A saved tiny llama base and a peft CAUSAL_LM adapter whose config names that folder."""
    root = tmp_path_factory.mktemp("auto")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(), config)
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    model.save_pretrained(root / "adapter")
    return root


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_causal_lm_loads_base_and_adapter_like_peft(llama_adapter):
    ours = lorakit.AutoPeftModelForCausalLM.from_pretrained(llama_adapter / "adapter")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(llama_adapter / "adapter")
    assert type(ours) is lorakit.PeftModelForCausalLM and not ours.training
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=1e-6)
    base = tiny_llama()
    assert not torch.allclose(_logits(ours), _logits(base))  # the adapter (init False) changes the output


def test_base_model_kwargs_and_trainable(llama_adapter):
    model = lorakit.AutoPeftModelForCausalLM.from_pretrained(
        llama_adapter / "adapter", is_trainable=True, torch_dtype=torch.bfloat16, adapter_name="mine"
    )
    assert model.get_base_model().dtype == torch.bfloat16
    assert model.active_adapter == "mine" and model.training
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["mine"].weight
    assert lora_a.requires_grad and lora_a.dtype == torch.float32  # autocast adapter dtype


def test_wrong_task_class_and_plain_auto_class_refused_like_peft(llama_adapter):
    with pytest.raises(ValueError, match="Expected target PEFT class: PeftModelForCausalLM"):
        peft.AutoPeftModelForSequenceClassification.from_pretrained(llama_adapter / "adapter")
    with pytest.raises(ValueError, match=r"Expected target PEFT class: PeftModelForCausalLM.*SequenceClassification"):
        lorakit.AutoPeftModelForSequenceClassification.from_pretrained(llama_adapter / "adapter")
    with pytest.raises(ValueError, match="Cannot use AutoPeftModel with task_type 'CAUSAL_LM'"):
        lorakit.AutoPeftModel.from_pretrained(llama_adapter / "adapter")
    with pytest.raises(OSError, match="from_pretrained"):
        lorakit.AutoPeftModelForCausalLM()


def test_auto_peft_model_uses_auto_mapping(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    mapping = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping["base_model_class"] == "LlamaForCausalLM"
    ours = lorakit.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    theirs = peft.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    assert type(ours) is lorakit.PeftModel and type(ours.get_base_model()).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=1e-6)
    # a library outside the allowlist is never imported
    data = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    data["auto_mapping"]["parent_library"] = "os"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="wants to import 'os', which is not in the import allowlist"):
        lorakit.AutoPeftModel.from_pretrained(tmp_path / "adapter")


def test_sequence_classification_head_is_restored(tmp_path):
    base = tiny_bert_cls()
    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lorakit.get_peft_model(
            tiny_bert_cls(), lorakit.LoraConfig(task_type="SEQ_CLS", target_modules=["query"])
        )
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    ours = lorakit.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    theirs = peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits, rtol=0, atol=1e-6)


def test_missing_base_name_is_a_clear_error(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no base_model_name_or_path"):
        lorakit.AutoPeftModelForCausalLM.from_pretrained(tmp_path)


def test_larger_tokenizer_in_the_adapter_folder_grows_the_embeddings(llama_adapter, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(100)}  # the base has 96 embeddings
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for file in (llama_adapter / "adapter").iterdir():
        (adapter / file.name).write_bytes(file.read_bytes())
    tokenizer.save_pretrained(adapter)
    ours = lorakit.AutoPeftModelForCausalLM.from_pretrained(adapter)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert ours.get_base_model().get_input_embeddings().weight.shape[0] == 100
    assert theirs.get_base_model().get_input_embeddings().weight.shape[0] == 100
