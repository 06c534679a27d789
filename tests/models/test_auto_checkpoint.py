"""use_gradient_checkpointing="auto": the search of visiontune.models.auto_checkpoint on a real tiny model.

On the CPU the measurement is what autograd keeps for backward (saved_activation_bytes), the same search the
trainer runs on a GPU with the allocator's peak; the GPU path itself is tested under the gpu marker."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from visiontune import FastVisionModel, VisionDataCollator
from visiontune.kernels.cross_entropy import DEFAULT_CHUNK_BYTES
from visiontune.models.auto_checkpoint import (LOW_LOSS_CHUNK_BYTES, choose_counts, install_choice,
                                               plan_checkpointing, saved_activation_bytes)
from visiontune.models.checkpointing import layer_stacks
from visiontune.models.state import vision_state


@pytest.mark.parametrize("floor, vis, lm, budget, expected", [
    (100, 10, 20, 1000, (0, 0)),      # everything fits: nothing checkpointed
    (100, 10, 20, 100, (4, 6)),       # no room: everything checkpointed
    (100, 10, 20, 100 + 3 * 20 + 5, (4, 3)),  # room for 3 LM layers, not a 4th, no vision block
    (100, 10, 20, 100 + 6 * 20 + 25, (2, 0)),  # every LM layer stored, then 2 of 4 vision blocks
    (100, 10, 0, 130, (1, 0)),        # free LM layers (cost 0) are all stored
])
def test_choose_counts_stores_lm_layers_first_then_vision_blocks(floor, vis, lm, budget, expected):
    assert choose_counts(4, 6, floor, vis, lm, budget) == expected


def _model_and_step(tiny_model_dir):
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=False)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=8)
    img = Image.new("RGB", (96, 64), "white")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": img},
                                                        {"type": "text", "text": "Digits?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "0123456789" * 3}]}]}] * 2
    batch = VisionDataCollator(model, processor)(rows)
    model.train()

    def step():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    return model, step


def _measured(model, step, nv: int, nl: int) -> float:
    vision, lm = layer_stacks(model)
    from visiontune.models.checkpointing import checkpoint_modules

    handle = checkpoint_modules(vision[:nv] + lm[:nl])
    try:
        return saved_activation_bytes(step, torch.device("cpu"))
    finally:
        handle.remove()


def test_auto_choice_is_the_fewest_checkpointed_layers_that_fit(tiny_model_dir):
    model, step = _model_and_step(tiny_model_dir)
    vision, lm = layer_stacks(model)
    assert len(vision) >= 2 and len(lm) >= 2
    floor = _measured(model, step, len(vision), len(lm))
    none = _measured(model, step, 0, 0)
    assert none > floor > 0
    # Room for about half of what storing every layer costs: some layers stored, some checkpointed.
    budget = floor + 0.5 * (none - floor)
    choice = plan_checkpointing(model, step, budget)
    assert choice.fits and choice.peak_bytes <= budget and choice.mode == "recompute"
    assert 0 < choice.vision_checkpointed + choice.lm_checkpointed < len(vision) + len(lm)
    assert choice.peak_bytes == _measured(model, step, choice.vision_checkpointed, choice.lm_checkpointed)
    # Fewest: storing one more layer (LM layers are stored first, then vision blocks) goes over the budget.
    if choice.vision_checkpointed:
        assert _measured(model, step, choice.vision_checkpointed - 1, choice.lm_checkpointed) > budget
    else:
        assert _measured(model, step, 0, choice.lm_checkpointed - 1) > budget
    assert all(p["peak_bytes"] > 0 for p in choice.probes) and len(choice.probes) <= 6
    assert "forward" not in lm[0].__dict__ and "forward" not in vision[0].__dict__  # probes leave nothing behind
    params = choice.as_params()
    assert params["ckpt_auto_lm_checkpointed"] == choice.lm_checkpointed and params["ckpt_auto_fits"] is True

    handle = install_choice(model, choice)
    assert len(handle) == choice.vision_checkpointed + choice.lm_checkpointed
    assert saved_activation_bytes(step, torch.device("cpu")) == choice.peak_bytes
    handle.remove()


def test_auto_with_room_for_everything_checkpoints_nothing_and_below_the_floor_reports_it(tiny_model_dir):
    model, step = _model_and_step(tiny_model_dir)
    vision, lm = layer_stacks(model)
    none = _measured(model, step, 0, 0)
    roomy = plan_checkpointing(model, step, none * 1.01)
    assert (roomy.vision_checkpointed, roomy.lm_checkpointed, roomy.fits) == (0, 0, True)
    floor = _measured(model, step, len(vision), len(lm))
    tight = plan_checkpointing(model, step, floor * 0.5)
    assert not tight.fits and tight.mode == "recompute_offload"
    assert (tight.vision_checkpointed, tight.lm_checkpointed) == (len(vision), len(lm))
    assert "lower the batch size" in tight.summary()
    # the loss chunk was the last thing tried, and planning leaves the process's setting as it was
    assert tight.loss_chunk_bytes == LOW_LOSS_CHUNK_BYTES and vision_state(model).loss_chunk_bytes is None
    assert not roomy.loss_chunk_bytes and roomy.as_params()["ckpt_auto_loss_chunk_mib"] == "default"
    # the optimizer's state the probes cannot see counts against the budget too
    assert plan_checkpointing(model, step, none * 1.01, extra_bytes=none).lm_checkpointed > 0


def test_at_the_floor_auto_lowers_the_loss_chunk_and_installs_it_until_removed(tiny_model_dir):
    """On a GPU the chunked loss's logits (~640 MB a chunk) are the largest transient at the floor. The CPU path
    computes the loss unchunked, so the step is measured here as saved activations plus one chunk of the model's
    setting: with a budget between the floor with the default chunk and the floor with the low one, the planner
    lowers the chunk; the installed choice sets it on the model, and removing the handle restores it."""
    model, step = _model_and_step(tiny_model_dir)
    vision, lm = layer_stacks(model)
    state = vision_state(model)

    def measure(step_fn, device):
        return saved_activation_bytes(step_fn, device) + (state.loss_chunk_bytes or DEFAULT_CHUNK_BYTES)

    floor = _measured(model, step, len(vision), len(lm))  # offloading moves nothing off the CPU "device"
    budget = floor + (LOW_LOSS_CHUNK_BYTES + DEFAULT_CHUNK_BYTES) / 2
    choice = plan_checkpointing(model, step, budget, measure=measure)
    assert choice.fits and choice.mode == "recompute_offload" and choice.loss_chunk_bytes == LOW_LOSS_CHUNK_BYTES
    assert [p["loss_chunk_bytes"] for p in choice.probes[:3]] == [None, None, LOW_LOSS_CHUNK_BYTES]
    # then the search goes on with the low chunk (here the room it freed stores every layer again)
    assert choice.peak_bytes == _measured(model, step, choice.vision_checkpointed, choice.lm_checkpointed) + LOW_LOSS_CHUNK_BYTES
    assert choice.peak_bytes <= budget
    assert "loss chunks of 128 MiB" in choice.summary() and choice.as_params()["ckpt_auto_loss_chunk_mib"] == 128
    assert state.loss_chunk_bytes is None
    handle = install_choice(model, choice)
    try:
        assert state.loss_chunk_bytes == LOW_LOSS_CHUNK_BYTES
    finally:
        handle.remove()
    assert state.loss_chunk_bytes is None
    # with room for the default chunk at the floor the chunk is left alone
    assert plan_checkpointing(model, step, floor + DEFAULT_CHUNK_BYTES * 1.01, measure=measure).loss_chunk_bytes is None


def test_auto_off_a_gpu_plans_against_ram_and_trains_as_the_chosen_setting(tiny_model_dir, tmp_path):
    """"auto" on the CPU: every layer checkpointed at load; at train start the trainer measures the first batch
    (saved activations against the available RAM), installs the choice (here: nothing checkpointed), and the
    probes leave the data order and random draws alone, so the run's losses and adapters equal a run made with
    that setting (False) from the start. A budget below the floor checkpoints everything and says so."""
    from visiontune import SFTConfig, SFTTrainer

    img = Image.new("RGB", (64, 64), "white")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": str(40 + i)}]}]} for i in range(6)]

    def run(mode, **cfg):
        torch.manual_seed(0)
        model, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=mode)
        model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=8, lora_dropout=0.1)
        state = vision_state(model)
        vision, lm = layer_stacks(model)
        if mode == "auto":
            assert state.checkpoint_plan == (1.0, "recompute") and len(state.checkpoint_handle) == len(vision) + len(lm)
        trainer = SFTTrainer(model, SFTConfig(output_dir=str(tmp_path / str(mode)), max_steps=3, logging_steps=1,
                                              per_device_train_batch_size=2, seed=0, report_to="none", **cfg),
                             train_dataset=rows)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return trainer, state, (vision, lm), losses, lora

    trainer, state, (vision, lm), losses, lora = run("auto")
    choice = trainer.checkpoint_choice
    assert choice is not None and state.auto_choice is choice and choice.fits
    assert (choice.vision_checkpointed, choice.lm_checkpointed) == (0, 0) and not state.checkpoint_handle
    _, _, _, want_losses, want_lora = run(False)
    assert losses == want_losses
    for n, p in lora.items():
        torch.testing.assert_close(p, want_lora[n], atol=0, rtol=0, msg=n)

    tight, state, (vision, lm), _, _ = run("auto", checkpoint_budget_gib=1e-6)
    assert not tight.checkpoint_choice.fits
    assert len(state.checkpoint_handle) == len(vision) + len(lm)
    with pytest.raises(ValueError, match="checkpoint_budget"):
        SFTConfig(output_dir=str(tmp_path), checkpoint_budget=1.5)


def test_auto_under_several_processes_keeps_every_layer_checkpointed(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Ranks measure different batches and could choose differently: "auto" does not measure under a launcher."""
    from visiontune import SFTConfig, SFTTrainer

    model, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing="auto")
    model = FastVisionModel.get_peft_model(model, r=4)
    vision, lm = layer_stacks(model)
    img = Image.new("RGB", (64, 64), "white")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "7"}]}]}] * 2
    trainer = SFTTrainer(model, SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none"), train_dataset=rows)
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    with caplog.at_level("WARNING"):
        trainer._auto_checkpointing()
    assert "under 2 processes" in caplog.text
    assert trainer.checkpoint_choice is None and vision_state(model).auto_choice is None
    assert len(vision_state(model).checkpoint_handle) == len(vision) + len(lm)


@pytest.mark.gpu
def test_auto_on_the_gpu_installs_a_measured_choice_under_the_budget(tiny_model_dir, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from visiontune import SFTConfig, SFTTrainer

    model, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing="auto",
                                               dtype="bfloat16")
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=8)
    img = Image.new("RGB", (448, 448), "white")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "1234567890" * 20}]}]}] * 8
    base = torch.cuda.memory_allocated()
    trainer = SFTTrainer(model, SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                                          checkpoint_budget_gib=(base + 64 * 2**20) / 2**30), train_dataset=rows)
    trainer.train()
    choice = trainer.checkpoint_choice
    assert choice is not None and vision_state(model).auto_choice is choice
    assert choice.peak_bytes <= choice.budget_bytes or not choice.fits
    assert len(vision_state(model).checkpoint_handle) == choice.vision_checkpointed + choice.lm_checkpointed
