"""Our layers inside `transformers.Trainer` on CPU: (a) a tiny Llama after `ck.apply(model, "cersa")`,
(b) a PEFT LoRA model after `patch_peft`. Each trains a few steps with checkpoints, resumes from
the first checkpoint to the same final parameters, and (a) reloads the adapter saved by our
Trainer callback into a fresh model with identical outputs."""
import copy
import os

import peft
import pytest
import torch
import transformers

import cersa_kernels as ck
from cersa_kernels._alloc import AllocationRecorder
from cersa_kernels.peft_interop import patch_peft, trainer_callback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB, STEPS = 96, 4


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


def dataset():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2 * STEPS, 12), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer(model, output_dir, callbacks=()):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
        learning_rate=1e-2, use_cpu=True, report_to=[], seed=0, logging_steps=100, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=list(callbacks))


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_parameters(got, want):
    assert sorted(got) == sorted(want) and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0, msg=name)


def cersa_model():
    model = tiny_llama()
    ck.apply(model, "cersa", energy=0.9, target_modules=["q_proj", "v_proj", "up_proj"])
    return model


@pytest.mark.slow
def test_trainer_trains_cersa_model_resumes_and_saves_our_adapter(tmp_path):
    model = cersa_model()
    start = trainable_state(model)
    trainer(model, tmp_path / "run", [trainer_callback()]).train()
    final = trainable_state(model)
    assert any(not torch.equal(start[n], final[n]) for n in final)
    for step in (2, STEPS):
        assert (tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors").is_file()
        assert (tmp_path / "run" / f"checkpoint-{step}" / "cersa_adapter" / "cersa_config.json").is_file()

    resumed = cersa_model()
    trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert_same_parameters(trainable_state(resumed), final)

    # our format: the adapter alone, rebuilt over a fresh copy of the original model
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
    for directory in (tmp_path / "run" / f"checkpoint-{STEPS}" / "cersa_adapter", tmp_path / "run" / "cersa_adapter"):
        fresh = ck.load(tiny_llama(), directory).eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh(input_ids=ids).logits, want, atol=0, rtol=0)


def patched_peft_model():
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    )
    patch_peft(model)
    return model


@pytest.mark.slow
def test_trainer_trains_patched_peft_model_and_resumes(tmp_path):
    model = patched_peft_model()
    start = trainable_state(model)
    with AllocationRecorder() as count:
        trainer(model, tmp_path / "run").train()
    assert count.cersa_ops.count("lora_fwd") >= STEPS * 4  # 4 LoRA layers per forward, every step on our op
    final = trainable_state(model)
    assert all(not torch.equal(start[n], final[n]) for n in final)  # B starts at zero: every factor moved
    for step in (2, STEPS):
        assert (tmp_path / "run" / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()

    resumed = patched_peft_model()
    trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    # the dropout masks come from seeds drawn from torch's RNG, which the checkpoint restores
    assert_same_parameters(trainable_state(resumed), final)

    # the checkpoint is a plain PEFT adapter
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "run" / f"checkpoint-{STEPS}").eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-6, rtol=1e-5)
