"""visiontune.trainer: Unsloth's vision training idiom on TRL 1.x, through TRL's names and through ours."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
from PIL import Image

import trl
from transformers import TextStreamer, TrainerCallback

import visiontune
from visiontune import FastVisionModel
from visiontune import trainer as vt_trainer
from visiontune.models.state import vision_state
from visiontune.testing import ARCHITECTURES
from visiontune.trainer import UnslothVisionDataCollator, as_train_dataset


def _rows(n: int = 8) -> list[dict]:
    """Unsloth's `converted_dataset`: a plain list of {"messages": [...]}, one image per conversation."""
    img = Image.new("RGB", (64, 64), "red")
    return [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red red red"}]},
    ]} for _ in range(n)]


def _unsloth_idiom(SFTTrainer, SFTConfig, model, tokenizer, converted_dataset, **config):  # noqa: N803
    """The Unsloth vision page's training cell as written, with `config` replacing some of its settings."""
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=30,
                    learning_rate=2e-4, optim="adamw_8bit", remove_unused_columns=False,
                    dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True},
                    max_seq_length=2048, report_to="none")
    trainer = SFTTrainer(model=model, tokenizer=tokenizer,
                         data_collator=UnslothVisionDataCollator(model, tokenizer),
                         train_dataset=converted_dataset,
                         args=SFTConfig(**{**settings, **config}))
    trainer.train()
    return trainer


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _checkpointing(args) -> bool:
    """transformers' activation checkpointing in force (5.2x: activation_checkpointing; before: gradient_)."""
    return bool(getattr(args, "activation_checkpointing", args.gradient_checkpointing))


def _peft_model(path: str):
    model, tokenizer = FastVisionModel.from_pretrained(path)
    return FastVisionModel.get_peft_model(model, r=16, lora_alpha=16), tokenizer


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_unsloth_idiom_with_trl_names_trains_generates_and_trains_again(arch, tiny_model_dir, tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.chdir(tmp_path)  # the idiom gives no output_dir: TRL writes under ./trainer_output
    model, tokenizer = _peft_model(tiny_model_dir(arch))
    trainer = _unsloth_idiom(trl.SFTTrainer, trl.SFTConfig, model, tokenizer, _rows(),
                             max_steps=6, gradient_accumulation_steps=1, learning_rate=1e-2, logging_steps=1)
    assert isinstance(trainer, trl.SFTTrainer) and isinstance(trainer.args, trl.SFTConfig)
    assert trainer.args.max_length == 2048 and trainer.args.bf16 is (torch.cuda.is_available()
                                                                       and torch.cuda.is_bf16_supported())
    first = _losses(trainer)
    assert len(first) == 6 and first[-1] < 0.5 * first[0], first

    FastVisionModel.for_inference(model)
    image = Image.new("RGB", (64, 64), "red")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    input_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    inputs = tokenizer(image, input_text, add_special_tokens=False, return_tensors="pt").to(model.device)
    capsys.readouterr()
    out = model.generate(**inputs, streamer=TextStreamer(tokenizer, skip_prompt=True), max_new_tokens=8)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 8
    assert capsys.readouterr().out.strip() == tokenizer.decode(new).strip()

    FastVisionModel.for_training(model)
    trainer.args.max_steps = 2
    trainer.train()  # a new run: the log history starts again
    again = _losses(trainer)
    assert len(again) == 2 and all(math.isfinite(x) for x in again)
    assert again[0] < 0.5 * first[0]  # training went on from the trained adapter


def test_unsloth_idiom_with_visiontune_names(tiny_model_dir, tmp_path, monkeypatch):
    from visiontune import SFTConfig, SFTTrainer

    monkeypatch.chdir(tmp_path)
    model, tokenizer = _peft_model(tiny_model_dir("mllama"))
    trainer = _unsloth_idiom(SFTTrainer, SFTConfig, model, tokenizer, _rows(), max_steps=3, learning_rate=1e-2,
                             logging_steps=1)  # gradient_accumulation_steps=4, as on the page
    assert type(trainer) is SFTTrainer and type(trainer.args) is SFTConfig
    losses = _losses(trainer)
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_visiontune_trainer_defaults_need_only_model_data_and_steps(tiny_model_dir, tmp_path):
    """Processor from the model, VisionDataCollator, VLM settings; list eval data shares the collator."""
    from visiontune import SFTConfig, SFTTrainer, VisionDataCollator

    model, _ = _peft_model(tiny_model_dir("qwen2_5_vl"))
    rows = _rows(4)
    trainer = SFTTrainer(model, SFTConfig(output_dir=str(tmp_path), max_steps=2, logging_steps=1, learning_rate=1e-2),
                         train_dataset=rows, eval_dataset={"held_out": rows[:2]})
    assert isinstance(trainer.data_collator.collator, VisionDataCollator)
    assert trainer.processing_class is vision_state(model).processor
    assert trainer.data_collator.dropped == 0  # attributes of the collator read through the list wrapper
    trainer.train()
    assert math.isfinite(trainer.evaluate()["eval_held_out_loss"])


def test_calls_trl_accepts_run_trl_unchanged(tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path), bf16=False, max_length=512)
    assert type(args) is trl.SFTConfig
    assert (args.remove_unused_columns, _checkpointing(args), args.dataset_kwargs) == (True, True, None)
    assert "__init__" not in vars(trl.SFTConfig) or trl.SFTConfig.__init__.__qualname__ == "SFTConfig.__init__"
    assert "__init__" in vars(trl.SFTTrainer) and trl.SFTTrainer.__init__.__module__ == "trl.trainer.sft_trainer"
    for clone in (copy.deepcopy(args), pickle.loads(pickle.dumps(args))):
        assert type(clone) is trl.SFTConfig and clone.max_length == 512
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bf16"):  # TRL's bf16 default on a CPU-only machine: still TRL's error
            trl.SFTConfig(output_dir=str(tmp_path))

    class Mine(trl.SFTConfig):  # subclasses of TRL's classes are never redirected
        pass

    with pytest.raises(TypeError, match="max_seq_length"):
        Mine(output_dir=str(tmp_path), bf16=False, max_seq_length=512)


def test_refused_config_call_gets_visiontune_defaults(tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path), max_seq_length=512)
    assert type(args) is vt_trainer.SFTConfig and isinstance(args, trl.SFTConfig)
    assert (args.max_length, args.max_seq_length) == (512, 512)
    assert args.remove_unused_columns is False and args.dataset_kwargs == {"skip_prepare_dataset": True}
    assert not _checkpointing(args)
    assert pickle.loads(pickle.dumps(args)).max_length == 512
    assert visiontune.SFTConfig(output_dir=str(tmp_path), max_length=300).max_seq_length == 300
    with pytest.raises(ValueError, match="pass one of them"):
        visiontune.SFTConfig(output_dir=str(tmp_path), max_seq_length=512, max_length=256)


def test_trainer_dispatch(tiny_model_dir, tmp_path, caplog):
    from datasets import Dataset

    model, processor = _peft_model(tiny_model_dir("gemma3"))  # FastVisionModel's checkpointing installed

    def args():  # TRL's own config with TRL's gradient_checkpointing=True
        return trl.SFTConfig(output_dir=str(tmp_path), bf16=False, remove_unused_columns=False, max_length=None,
                             dataset_kwargs={"skip_prepare_dataset": True})

    collator = UnslothVisionDataCollator(model, processor)
    arrow = Dataset.from_dict({"n": [1, 2]})
    trl_own = trl.SFTTrainer(model, args(), collator, arrow, processing_class=processor)
    assert type(trl_own) is trl.SFTTrainer and _checkpointing(trl_own.args)
    assert not hasattr(trl_own, "budget_report")  # TRL's own code: no token budget
    ours = trl.SFTTrainer(model, args(), collator, _rows(2), processing_class=processor)
    assert type(ours) is vt_trainer.SFTTrainer and not _checkpointing(ours.args)
    assert "recompute every layer twice" in caplog.text
    assert type(trl.SFTTrainer(model, args(), collator, arrow, tokenizer=processor)) is vt_trainer.SFTTrainer
    with pytest.raises(TypeError, match="pass one of them"):
        trl.SFTTrainer(model, args(), collator, arrow, processing_class=processor, tokenizer=processor.tokenizer)


def _row(question: str, answer: str, image_first: bool = True) -> dict:
    img = Image.new("RGB", (64, 64), "red")
    parts = [{"type": "image", "image": img}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": parts if image_first else parts[::-1]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def test_trainer_runs_the_token_budget_once_before_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The seed page's idiom through TRL's names, with one row too long (cut after its image) and one whose image
    ends past max_seq_length: that one is left out before the first step, one line is printed, and the counts and
    the histogram land in the active MLflow run."""
    import mlflow

    from visiontune.budget import HISTOGRAM_FILE, token_budget

    monkeypatch.chdir(tmp_path)
    path = tiny_model_dir("qwen2_5_vl")
    rows = [*_rows(3), _row("Colour?", " ".join(["red"] * 60)), _row("Colour? " * 30, "red", image_first=False)]
    free = token_budget(UnslothVisionDataCollator(*FastVisionModel.from_pretrained(path)), rows, progress=False)
    limit = free.lengths[0] + 5  # the short rows fit; the long answer is cut after its image; the late image cannot be
    assert free.image_ends[3] < limit < free.lengths[3] and free.image_ends[4] > limit
    model, tokenizer = FastVisionModel.from_pretrained(path, max_seq_length=limit)
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    capsys.readouterr()
    with mlflow.start_run() as run, warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dropped a sample.*")  # no drop found mid-training
        trainer = _unsloth_idiom(trl.SFTTrainer, trl.SFTConfig, model, tokenizer, rows, max_steps=2,
                                 gradient_accumulation_steps=1, logging_steps=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("token budget:")]
    assert len(lines) == 1 and "5 samples" in lines[0] and "1 truncated" in lines[0] and "1 dropped" in lines[0], lines
    assert trainer.budget_report.verdicts == ["fit", "fit", "fit", "truncate", "drop"]
    assert trainer.budget_report.lengths == free.lengths  # measured as the collator encodes them
    assert len(trainer.train_dataset) == 4 and trainer.state.global_step == 2
    assert trainer.data_collator.dropped == 0 and trainer.data_collator.truncated >= 1
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert (logged["budget/samples"], logged["budget/truncated"], logged["budget/dropped"]) == (5, 1, 1)
    assert logged["budget/max_seq_length"] == limit
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {HISTOGRAM_FILE, "token_budget.json"} <= artifacts
    trainer.args.max_steps = 1
    trainer.train()  # training again: measured once only
    assert "token budget" not in capsys.readouterr().out and len(trainer.train_dataset) == 4

    # visiontune's config can switch it off; TRL's own trainer (a call TRL accepts) never runs it
    off = visiontune.SFTTrainer(model, visiontune.SFTConfig(output_dir=str(tmp_path / "off"), token_budget=False,
                                                            max_steps=1, report_to="none"), train_dataset=rows[:4])
    off.train()
    assert off.budget_report is None and "token budget" not in capsys.readouterr().out


def test_8bit_optimizer_falls_back_with_one_warning_where_bitsandbytes_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(vt_trainer, "bnb_adamw_unusable", lambda device, bits, paged: "no bitsandbytes build here")
    with pytest.warns(UserWarning, match="optim='adamw_torch' instead") as caught:
        args = trl.SFTConfig(output_dir=str(tmp_path), optim="adamw_8bit", max_seq_length=64)
    assert len([w for w in caught if "bitsandbytes" in str(w.message)]) == 1
    assert args.optim == "adamw_torch"
    monkeypatch.setattr(vt_trainer, "bnb_adamw_unusable", lambda device, bits, paged: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert visiontune.SFTConfig(output_dir=str(tmp_path), optim="paged_adamw_8bit").optim == "paged_adamw_8bit"


def test_as_train_dataset_indexes_lists_and_passes_datasets_through():
    from datasets import Dataset

    rows = _rows(3)
    ds = as_train_dataset(rows, start=5)
    assert ds.column_names == [vt_trainer.INDEX_COLUMN] and ds[:][vt_trainer.INDEX_COLUMN] == [5, 6, 7]
    assert ds._vt_rows == rows
    arrow = Dataset.from_dict({"a": [1]})
    assert as_train_dataset(arrow) is arrow


def _engine_pair(path: str):
    """The same LoRA model twice: one with the fused-kernel engine patched in (forced on the CPU, where its
    torch references run), one without."""
    from visiontune.kernels import patch_model

    model, tokenizer = _peft_model(path)
    plain, _ = _peft_model(path)  # loaded again (a deepcopy would share FastVisionModel's hooks with the original)
    plain.load_state_dict(model.state_dict())  # the same LoRA initialisation
    assert patch_model(model, enabled=True).active
    return model, plain, tokenizer


def _item_calls(monkeypatch) -> list:
    calls: list = []
    original = torch.Tensor.item

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    return calls


def test_engine_loss_path_logs_what_trls_path_logs(tiny_model_dir, tmp_path):
    """On a patched model the SFT loss comes from the engine's chunked log-probs (TRL's fused head bypassed) and
    every logged value (loss, entropy, token accuracy, token count) equals TRL's path on the same weights."""
    from visiontune import SFTConfig, SFTTrainer
    from visiontune.align.engine import engine_installed

    engine_model, plain_model, _ = _engine_pair(tiny_model_dir("qwen2_5_vl"))
    logs = {}
    for name, model in (("engine", engine_model), ("trl", plain_model)):
        trainer = SFTTrainer(model, SFTConfig(output_dir=str(tmp_path / name), max_steps=3, logging_steps=1,
                                              learning_rate=1e-2, per_device_train_batch_size=2),
                             train_dataset=_rows(6))
        assert trainer.uses_fused_engine is (name == "engine")
        assert engine_installed(model) is (name == "engine")
        trainer.train()
        logs[name] = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs["engine"]) == len(logs["trl"]) == 3
    for e, t in zip(logs["engine"], logs["trl"]):
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert e[key] == pytest.approx(t[key], rel=1e-4, abs=1e-6), (key, e, t)
        assert e["num_tokens"] == t["num_tokens"] > 0
    assert logs["engine"][-1]["loss"] < logs["engine"][0]["loss"]


def test_engine_loss_path_keeps_step_metrics_on_the_device_until_the_log(tiny_model_dir, tmp_path, monkeypatch):
    """TRL reads entropy, token accuracy and the token count to the host on every step (three syncs); the engine
    path keeps them as one device tensor per step and reads them once, at the next log, to the same values."""
    from visiontune import SFTConfig, SFTTrainer, VisionDataCollator

    engine_model, plain_model, tokenizer = _engine_pair(tiny_model_dir("qwen2_5_vl"))
    batch = VisionDataCollator(engine_model, tokenizer)(_rows(3))
    out: dict[str, dict] = {}
    calls = _item_calls(monkeypatch)
    for name, model in (("engine", engine_model), ("trl", plain_model)):
        trainer = SFTTrainer(model, SFTConfig(output_dir=str(tmp_path / name), max_steps=1), train_dataset=_rows(3))
        model.train()
        before = len(calls)
        loss = trainer.compute_loss(model, dict(batch))
        loss2 = trainer.compute_loss(model, dict(batch))
        out[name] = {"item_calls": len(calls) - before, "pending": len(trainer._device_metrics["train"]),
                     "host_lists": {k: len(v) for k, v in trainer._metrics["train"].items()}}
        logs = {"loss": float(loss)}
        trainer.log(logs)
        assert float(loss2) == pytest.approx(float(loss))
        out[name]["logs"] = logs
    engine, trl_side = out["engine"], out["trl"]
    assert engine["pending"] == 2 and engine["host_lists"] == {}  # nothing read back yet
    assert trl_side["pending"] == 0 and trl_side["host_lists"]["entropy"] == 2
    assert engine["item_calls"] <= trl_side["item_calls"] - 6  # TRL: 3 host reads per step, here none
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
        assert engine["logs"][key] == pytest.approx(trl_side["logs"][key], rel=1e-5), key
    assert engine["logs"]["num_tokens"] == 2 * batch["attention_mask"].sum().item()


def test_engine_loss_path_evaluates_as_trls_path(tiny_model_dir, tmp_path):
    """evaluate() on the engine path: the eval loss and the eval metrics, read at the eval log, equal TRL's."""
    from visiontune import SFTConfig, SFTTrainer

    engine_model, plain_model, _ = _engine_pair(tiny_model_dir("qwen2_5_vl"))
    results = {}
    for name, model in (("engine", engine_model), ("trl", plain_model)):
        trainer = SFTTrainer(model, SFTConfig(output_dir=str(tmp_path / name), max_steps=1,
                                              per_device_eval_batch_size=2), train_dataset=_rows(4),
                             eval_dataset=_rows(3))
        results[name] = trainer.evaluate()
        assert not trainer._device_metrics["eval"]  # read at the eval log
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        assert results["engine"][key] == pytest.approx(results["trl"][key], rel=1e-5), key


@pytest.mark.parametrize("how", ["non_padding", "all"])
def test_input_token_count_waits_for_the_log_and_the_checkpoint_and_adds_up_as_transformers_does(
        tiny_model_dir, tmp_path, how):
    """transformers reads every batch's token count to the host; visiontune's trainer keeps it pending until the next
    log or checkpoint: the logged counts, the final state and the checkpoint's trainer_state.json are the same."""
    import json

    from visiontune import SFTConfig, SFTTrainer

    model, _ = _peft_model(tiny_model_dir("qwen2_5_vl"))
    rows = _rows(6)
    for i, row in enumerate(rows):  # answers of different lengths: padding in every batch
        row["messages"][1]["content"][0]["text"] = "red " * (1 + i)
    class PerStep(SFTTrainer):  # transformers' own count: read to the host at every step
        _track_num_input_tokens = trl.SFTTrainer._track_num_input_tokens

    class AtStepEnd(TrainerCallback):  # what a progress callback reads at each step's end
        def __init__(self):
            self.counts = []

        def on_step_end(self, args, state, control, **kw):
            self.counts.append(state.num_input_tokens_seen)

    seen = {}
    for name, cls in (("visiontune", SFTTrainer), ("transformers", PerStep)):
        at_step_end = AtStepEnd()
        trainer = cls(model, SFTConfig(output_dir=str(tmp_path / name), max_steps=3, logging_steps=2, save_steps=3,
                                       per_device_train_batch_size=2, learning_rate=0.0,
                                       include_num_input_tokens_seen=how), train_dataset=rows,
                      callbacks=[at_step_end])
        trainer.train()
        saved = json.loads((tmp_path / name / "checkpoint-3" / "trainer_state.json").read_text())
        seen[name] = (trainer.state.num_input_tokens_seen, saved["num_input_tokens_seen"],
                      [h["num_input_tokens_seen"] for h in trainer.state.log_history if "loss" in h],
                      at_step_end.counts[0])  # the first step's count is up to date at its end
    assert seen["visiontune"] == seen["transformers"] and seen["visiontune"][0] > 0

    trainer = SFTTrainer(model, SFTConfig(output_dir=str(tmp_path / "pending"), max_steps=1,
                                          include_num_input_tokens_seen=how), train_dataset=rows)
    batch = trainer.data_collator([{"_vt_index": 0}, {"_vt_index": 1}])
    trainer._track_num_input_tokens(batch)
    assert trainer.state.num_input_tokens_seen == 0 and len(trainer._pending_input_tokens) == 1
    trainer.log({"loss": 1.0})
    expected = int(batch["attention_mask"].sum()) if how == "non_padding" else batch["input_ids"].numel()
    assert trainer.state.num_input_tokens_seen == expected and not trainer._pending_input_tokens


def test_total_flos_is_transformers_estimate_with_the_parameter_count_taken_once(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """transformers walks every module to count parameters at every step for ``total_flos``; visiontune's
    trainer counts them once per model: the state's and the checkpoint's ``total_flos`` are transformers'."""
    import json

    from visiontune import SFTConfig, SFTTrainer

    model, _ = _peft_model(tiny_model_dir("qwen2_5_vl"))
    rows = _rows(6)

    class PerStep(SFTTrainer):  # transformers' own estimate, counted at every step
        floating_point_ops = trl.SFTTrainer.floating_point_ops

    counts = []
    cls = type(model.get_base_model())  # the PEFT model hands num_parameters on to it
    real = cls.num_parameters
    monkeypatch.setattr(cls, "num_parameters", lambda self, *a, **k: counts.append(1) or real(self, *a, **k))
    flos = {}
    for name, trainer_cls in (("visiontune", SFTTrainer), ("transformers", PerStep)):
        counts.clear()
        trainer = trainer_cls(model, SFTConfig(output_dir=str(tmp_path / name), max_steps=3, save_steps=3,
                                       per_device_train_batch_size=2, learning_rate=0.0), train_dataset=rows)
        trainer.train()
        saved = json.loads((tmp_path / name / "checkpoint-3" / "trainer_state.json").read_text())
        flos[name] = (trainer.state.total_flos, saved["total_flos"], len(counts))
    assert flos["visiontune"][:2] == flos["transformers"][:2] and flos["visiontune"][0] > 0
    assert flos["transformers"][2] >= 3 and flos["visiontune"][2] == 1, flos


def test_per_step_train_and_zero_grad_skip_the_module_walk_and_train_the_same(tiny_model_dir, tmp_path, monkeypatch):
    """transformers calls model.train() and model.zero_grad() at every step; during visiontune's train() they do not
    walk the module tree when nothing would change: the same losses and adapter weights as transformers' calls, a
    module put in eval mode by a callback is back in training mode for the next step, and nothing is left on
    the model afterwards."""
    from contextlib import nullcontext

    from visiontune import SFTConfig, SFTTrainer
    from visiontune import trainer as vt_trainer

    full = {"train": 0, "zero_grad": 0}
    real_train, real_zero = torch.nn.Module.train, torch.nn.Module.zero_grad

    def counted(name, real):
        def call(self, *a, **k):
            if self is root[0]:
                full[name] += 1
            return real(self, *a, **k)
        return call

    root = [None]
    monkeypatch.setattr(torch.nn.Module, "train", counted("train", real_train))
    monkeypatch.setattr(torch.nn.Module, "zero_grad", counted("zero_grad", real_zero))

    class EvalsTheVisionTower(TrainerCallback):  # what a user's callback might do between steps
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                model.get_base_model().model.visual.eval()

    runs = {}
    for name in ("visiontune", "transformers"):
        if name == "transformers":
            monkeypatch.setattr(vt_trainer, "_lean_step_calls", lambda model: nullcontext())
        model, _ = _peft_model(tiny_model_dir("qwen2_5_vl"))
        root[0] = model
        seen_training = []
        visual = model.get_base_model().model.visual
        visual.register_forward_pre_hook(lambda m, a: seen_training.append(m.training))
        full.update(train=0, zero_grad=0)
        trainer = SFTTrainer(model, SFTConfig(output_dir=str(tmp_path / name), max_steps=4, logging_steps=1,
                                              per_device_train_batch_size=2, learning_rate=1e-2, seed=5),
                             train_dataset=_rows(8), callbacks=[EvalsTheVisionTower()])
        trainer.train()
        assert "train" not in vars(model) and "zero_grad" not in vars(model)
        runs[name] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                      {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                      list(seen_training), dict(full))
    lean, stock = runs["visiontune"], runs["transformers"]
    assert lean[0] == stock[0] and len(lean[0]) == 4
    for n, p in stock[1].items():
        torch.testing.assert_close(lean[1][n], p, atol=0, rtol=0)
    assert lean[2] == stock[2] == [True] * 4  # the eval()'d tower trains again at step 3
    assert stock[3]["train"] >= 4 and stock[3]["zero_grad"] >= 4
    # in full twice: at the first step (modules left in eval mode by loading) and after the callback's eval()
    assert lean[3]["zero_grad"] == 0 and lean[3]["train"] == 2, lean[3]
