"""Our layers under TRL's `SFTTrainer` on CPU, the way the README's "Training with TRL" says.

A tiny Llama (built offline from a config, seeded) gets our LoRA or CERSA layers with `ck.apply`,
then `trl.SFTTrainer` fine-tunes it for 4 steps on a small text dataset (tokenized by the trainer
with a word-level tokenizer built here), saving a checkpoint every 2 steps and our adapter beside
each (`ck.trainer_callback()`). A second run resumes from the step-2 checkpoint and must repeat
steps 3 and 4 exactly: the same losses and bit-identical trainable parameters. The adapter the
callback saved reloads into a fresh copy of the original model with bit-identical logits.
TRL's defaults are kept (bf16 autocast, which runs on the CPU too)."""
import os
import random

import datasets
import pytest
import torch
import transformers
import trl
from tokenizers import Tokenizer, models, pre_tokenizers

import cersa_kernels as ck

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORDS = [f"w{i}" for i in range(90)]
SPECIAL = ["<pad>", "<eos>", "<unk>"]
STEPS, TARGETS = 4, ["q_proj", "v_proj", "up_proj"]
METHODS = {"lora": {"rank": 4, "alpha": 8}, "cersa": {"energy": 0.9}}


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (vocabulary 93), so no file or download is needed."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def dataset() -> datasets.Dataset:
    draw = random.Random(1)
    texts = [" ".join(draw.choices(WORDS, k=draw.randint(6, 12))) for _ in range(2 * STEPS)]
    return datasets.Dataset.from_dict({"text": texts})


def original_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=1,
        bos_token_id=None,
    )
    return transformers.LlamaForCausalLM(config)


def adapted_model(method: str) -> transformers.LlamaForCausalLM:
    model = original_model()
    ck.apply(model, method, target_modules=TARGETS, **METHODS[method])
    return model


def sft_trainer(model, output_dir, callbacks=()) -> trl.SFTTrainer:
    args = trl.SFTConfig(
        output_dir=str(output_dir), max_steps=STEPS, save_strategy="steps", save_steps=2,
        per_device_train_batch_size=2, learning_rate=1e-2, weight_decay=0.0, max_length=16, use_cpu=True,
        report_to=[], seed=0, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    return trl.SFTTrainer(model=model, args=args, train_dataset=dataset(), processing_class=tokenizer(),
                          callbacks=list(callbacks))


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_sft_trainer_trains_checkpoints_resumes_and_saves_our_adapter(tmp_path, method):
    model = adapted_model(method)
    start = trainable_state(model)
    first = sft_trainer(model, tmp_path / "run", [ck.trainer_callback()])
    first.train()
    final = trainable_state(model)
    assert sorted(final) == sorted(start) and final
    assert all(not torch.equal(start[n], final[n]) for n in final)  # every adapter tensor trained
    assert sorted(losses(first)) == list(range(1, STEPS + 1))
    for step in (2, STEPS):
        assert (tmp_path / "run" / f"checkpoint-{step}" / "cersa_adapter" / "cersa_config.json").is_file()

    # resume from the step-2 checkpoint: parameters, optimizer, scheduler and RNG come back, so
    # steps 3 and 4 repeat the first run's exactly
    resumed_model = adapted_model(method)
    resumed = sft_trainer(resumed_model, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == STEPS
    assert {s: v for s, v in losses(resumed).items() if s > 2} == {s: v for s, v in losses(first).items() if s > 2}
    got = trainable_state(resumed_model)
    assert sorted(got) == sorted(final)
    for name in final:
        torch.testing.assert_close(got[name], final[name], atol=0, rtol=0, msg=name)

    # our adapter, saved by the callback, rebuilt over a fresh copy of the original model
    # (accelerate leaves the trained model's forward wrapped in bf16 autocast; compare in fp32)
    trained = first.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    ids = torch.randint(0, len(SPECIAL) + len(WORDS), (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = trained(input_ids=ids).logits
    for directory in (tmp_path / "run" / f"checkpoint-{STEPS}" / "cersa_adapter", tmp_path / "run" / "cersa_adapter"):
        fresh = ck.load(original_model(), directory).eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh(input_ids=ids).logits, want, atol=0, rtol=0)
