"""GRPO on Llama 3.2 Vision (Mllama): visiontune's GRPOTrainer hands the model the cross-attention mask and
aspect-ratio inputs TRL 1.16 leaves out (visiontune.align.mllama). In a left-padded batch of prompts of
different lengths, each row's log-probabilities and greedy completion equal the row's alone, and a
training run gives every forward its image inputs.

The tiny model's cross-attention gates start at zero (as in transformers' init), which hides the images
from the text model; they are opened here so that a wrong mask shows."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

PROMPTS = ["Read it.", "Transcribe the handwritten digits in this image, please, exactly as written."]
COMPLETIONS = ["12", "7 and 301"]


def _rows():
    from visiontune.align import grpo_rows

    images = [Image.new("RGB", (112, 56), "red"), Image.new("RGB", (56, 56), "blue")]  # 2 tiles and 1 tile
    convs = [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": text}]},
        {"role": "assistant", "content": [{"type": "text", "text": "1"}]}]} for im, text in zip(images, PROMPTS)]
    return grpo_rows(convs)


def _trainer(tiny_model_dir, tmp_path, **args):
    from visiontune import FastVisionModel, rewards
    from visiontune.align import GRPOConfig, GRPOTrainer

    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("mllama"), use_gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(1.0)  # open the cross-attention: the images (and their mask) now change the text model
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, finetune_vision_layers=False, random_state=0)
    config = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
                  learning_rate=1e-2, max_steps=2, logging_steps=1, beta=0.04, report_to="none", save_strategy="no",
                  seed=0, disable_tqdm=True, use_cpu=True)
    config.update(args)
    trainer = GRPOTrainer(model=model, reward_funcs=[rewards.cer], args=GRPOConfig(**config), train_dataset=_rows(),
                          processing_class=processor)
    assert trainer._mllama and trainer.uses_fused_engine
    trainer.model.eval()
    return trainer, processor


def _prompts(rows):
    from trl.data_utils import prepare_multimodal_messages

    return [prepare_multimodal_messages(r["prompt"], images=r["images"]) for r in rows]


def _alone(processor, prompt):
    """The row encoded by itself, as the processor does: no padding, its own cross-attention mask."""
    return processor.apply_chat_template([prompt], add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def _left_pad(rows, value):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return ids, mask


def test_log_probs_of_a_left_padded_batch_equal_each_row_alone(tiny_model_dir, tmp_path):
    from visiontune.align import mllama

    trainer, processor = _trainer(tiny_model_dir, tmp_path)
    tok = processor.tokenizer
    prompts = _prompts(_rows())
    prompt_ids, _, fields = trainer._tokenize_prompts(prompts)  # what TRL generates from
    assert len(prompt_ids[0]) != len(prompt_ids[1])  # the batch needs padding
    completions = [tok(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    p_ids, p_mask = _left_pad(prompt_ids, tok.pad_token_id)
    width = max(len(c) for c in completions)
    c_ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in completions])
    c_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    batch = processor(images=[r["images"] for r in _rows()], text=[tok.decode(r) for r in prompt_ids],
                      padding=True, return_tensors="pt")
    image_inputs = {k: batch[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    stale = torch.as_tensor(fields["cross_attention_mask"])  # the processor's, unpadded: not where TRL's tokens are

    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), width, batch_size=1,
            num_images=[1, 1], cross_attention_mask=stale, **image_inputs)
        # the loss pass's route: the aspect-ratio inputs ride with the model through TRL's _compute_loss
        wrapped = mllama.WithImageInputs(trainer.model, {k: image_inputs[k] for k in mllama.KEYS})
        logps_loss, _, _ = trainer._get_per_token_logps_and_entropies(
            wrapped, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), width,
            pixel_values=image_inputs["pixel_values"], num_images=[1, 1])
    torch.testing.assert_close(logps_loss, logps, atol=1e-5, rtol=1e-5)

    for b, prompt in enumerate(prompts):
        alone = _alone(processor, prompt)
        n = len(completions[b])
        ids = torch.cat([alone["input_ids"], torch.tensor([completions[b]])], 1)
        cross = alone["cross_attention_mask"]
        cross = torch.cat([cross, cross[:, -1:].expand(-1, n, -1, -1)], 1)  # as generate extends it
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=alone["pixel_values"],
                      aspect_ratio_ids=alone["aspect_ratio_ids"], aspect_ratio_mask=alone["aspect_ratio_mask"])
        with torch.no_grad():
            logits = trainer.model(**inputs, cross_attention_mask=cross, use_cache=False).logits[0, -n - 1:-1]
            blind = trainer.model(**inputs, cross_attention_mask=torch.zeros_like(cross),
                                  use_cache=False).logits[0, -n - 1:-1]
        want = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completions[b])[:, None])[:, 0]
        unseen = torch.log_softmax(blind.float(), -1).gather(-1, torch.tensor(completions[b])[:, None])[:, 0]
        torch.testing.assert_close(logps[b, :n], want, atol=1e-5, rtol=1e-5)
        assert (want - unseen).abs().max() > 1e-3  # the image matters: a wrong mask would show


def test_generation_sees_each_image_where_the_left_padded_prompt_has_it(tiny_model_dir, tmp_path):
    """The mask TRL would generate with is the processor's from each prompt's first token; the shim's is the
    processor's for the left-padded batch, and greedy batch completions equal each prompt's alone."""
    from visiontune.align import mllama
    from visiontune.models.state import padding_side

    trainer, processor = _trainer(tiny_model_dir, tmp_path)
    prompts = _prompts(_rows())
    prompt_ids, images, fields = trainer._tokenize_prompts(prompts)
    mask = mllama.generation_mask(trainer, prompt_ids, fields)
    with padding_side(processor, "left"):
        padded = processor.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               padding=True, return_tensors="pt")
    assert torch.equal(mask, padded["cross_attention_mask"])
    assert not torch.equal(torch.as_tensor(fields["cross_attention_mask"]), mask)  # TRL's, unmended, is off

    trainer.generation_config.do_sample = False
    batch, _ = trainer._generate_single_turn(prompt_ids, images, fields, 1)
    for b, prompt in enumerate(prompts):
        ids, imgs, own = trainer._tokenize_prompts([prompt])
        alone, _ = trainer._generate_single_turn(ids, imgs, own, 1)
        assert batch[b] == alone[0], (b, batch[b], alone[0])


def test_grpo_trains_mllama_with_its_image_inputs(tiny_model_dir, tmp_path):
    trainer, _ = _trainer(tiny_model_dir, tmp_path)
    inner = trainer.model.get_base_model()
    forward, seen = inner.forward, []

    def spy(*args, **kwargs):
        ids, cross = kwargs.get("input_ids"), kwargs.get("cross_attention_mask")
        if kwargs.get("pixel_values") is not None:  # the prompt passes (and every scoring pass) carry the images
            seen.append((bool(kwargs.get("fused_lm_head")), cross is not None and cross.shape[:2] == ids.shape,
                         kwargs.get("aspect_ratio_ids") is not None))
        return forward(*args, **kwargs)

    inner.forward = spy
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.train()
    trainer.train()
    assert trainer.state.global_step == 2
    scoring = [s for s in seen if s[0]]
    # per step: the reference's log-probs (beta > 0) and the loss pass; generation's prompt pass besides
    assert len(scoring) == 4 and len(seen) > len(scoring), seen
    assert all(mask_ok and ratio for _, mask_ok, ratio in seen), seen
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 2 and all(torch.isfinite(torch.tensor(rewards)))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)


def test_what_the_mllama_inputs_do_not_cover_is_refused_at_the_start(tiny_model_dir, tmp_path, monkeypatch):
    """GRPO with a custom rollout function (as with vLLM, continuous batching, tools, environments) generates
    outside the single-turn path the Mllama inputs are mended for; TRL's DPO collator leaves the prompt's
    cross-attention mask short of the answers. Both are refused before any work, with the reason."""
    from visiontune import FastVisionModel, rewards
    from visiontune.align import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, dpo_rows

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("mllama"), use_gradient_checkpointing=False)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, finetune_vision_layers=False, random_state=0)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=1,
                      report_to="none", save_strategy="no", use_cpu=True)
    with pytest.raises(ValueError, match=r"Llama 3.2 Vision \(Mllama\) with a custom rollout_func is not supported"):
        GRPOTrainer(model=model, reward_funcs=[rewards.cer], args=args, train_dataset=_rows(),
                    processing_class=processor, rollout_func=lambda prompts, trainer: {})
    pairs = dpo_rows([{"messages": [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (56, 56))},
                                                                 {"type": "text", "text": "Read it."}]}],
                       "chosen": "1", "rejected": "2"}])
    with pytest.raises(ValueError, match=r"DPO on Llama 3.2 Vision \(Mllama\) is not supported.*align.method: grpo"):
        DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                   train_dataset=pairs, processing_class=processor)
