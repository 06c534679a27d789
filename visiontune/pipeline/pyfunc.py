"""The served model: an MLflow ``PythonModel`` = base VLM + PEFT LoRA adapter.

MLflow's transformers flavor does not serve image-text-to-text models, so the registered model is a
custom pyfunc. Its artifacts are the adapter folder (with the processor used in training) and, when the
base model is a local directory (the offline demo's tiny model), that directory too, so a fresh process
on another machine needs nothing but the model URI. For a hub id only the id is stored
(``model_config["base_model"]``) and the weights come from the hub (or its cache) at load time.

Input: a pandas DataFrame with columns ``image`` (base64-encoded image bytes, raw bytes when called
in-process, or the path of a file under ``model_config["image_root"]`` when the model was registered with
``register.image_root``) and, optionally, ``prompt`` (the user text; missing or empty, it is the training
instruction recorded with the model). Output: one generated string per row.
``params={"max_new_tokens": n}`` overrides the generation length per request.

The served model takes requests from others: it reads no file outside ``image_root`` (none without it),
answers every refused image with one message (a caller cannot probe which files exist), and refuses
images over ``model_config["max_pixels"]`` from their header, before decoding (decompression bombs).
See docs/reliability.md.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Callable, Optional

import mlflow.pyfunc
import pandas as pd

from visiontune.images import MAX_PIXELS, ImageRule, open_served_image
from visiontune.inference import adapter_processor, generate_answers, require_adapter

ADAPTER_ARTIFACT = "adapter"
BASE_MODEL_ARTIFACT = "base_model"


def _build_samples(model_input: Any, default_prompt: Optional[str] = None,
                   open_image: Callable[[Any], Any] = lambda v: v) -> list[dict]:
    """Conversation samples from a DataFrame / dict / list of dicts with ``image`` and (optionally) ``prompt``;
    rows without a prompt get ``default_prompt``; each image value goes through ``open_image``."""
    import pandas as pd

    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input if isinstance(next(iter(model_input.values()), None), list)
                                   else [model_input])
    elif isinstance(model_input, list):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame with columns image and prompt, got {type(model_input).__name__}")
    if "prompt" not in model_input.columns and default_prompt is not None:
        model_input = model_input.assign(prompt=None)
    missing = {"image", "prompt"} - set(model_input.columns)
    if missing:
        raise ValueError(
            f"model input lacks column(s) {sorted(missing)} (got {list(model_input.columns)}); pass a DataFrame with "
            "'image' (base64 image bytes) and 'prompt' (text; optional for models that recorded an instruction)"
        )
    samples = []
    for image, prompt in model_input[["image", "prompt"]].itertuples(index=False):
        content: list[dict] = []
        no_image = image is None or (isinstance(image, float) and image != image) or (isinstance(image, str) and not image)
        if not no_image:  # None / NaN / "" make a text-only row
            content.append({"type": "image", "image": open_image(image)})
        if prompt is None or (isinstance(prompt, float) and prompt != prompt) or prompt == "":
            prompt = default_prompt or ""
        content.append({"type": "text", "text": str(prompt)})
        samples.append({"messages": [{"role": "user", "content": content}]})
    return samples


class VisionLoraModel(mlflow.pyfunc.PythonModel):
    """Base vision-language model + LoRA adapter, loaded from the model's artifacts.

    ``model_config`` keys (set by the register stage): ``base_model`` (hub id or original path, used when no
    ``base_model`` artifact was logged), ``max_new_tokens``, ``batch_size``, ``resize``, ``resize_dimension``,
    ``snap_to_patch_size`` (the training :class:`~visiontune.images.ImageRule`; a missing one takes the rule's
    default), ``dtype``, ``instruction`` (the training instruction: the prompt of rows that bring none),
    ``image_root`` (the only folder whose files a request may name; None: none) and ``max_pixels``.
    """

    def load_context(self, context: Any) -> None:
        """Load the base model (artifact dir or hub id), apply the adapter, switch to inference mode."""
        from peft import PeftModel

        from visiontune.models.fast_vision import FastVisionModel

        config = dict(context.model_config or {})
        artifacts = context.artifacts or {}
        base = artifacts.get(BASE_MODEL_ARTIFACT) or config.get("base_model")
        if not base:
            raise ValueError(
                "this model has neither a 'base_model' artifact nor model_config['base_model']; re-log it with the "
                "register stage (register.log_base_model) or set model_config={'base_model': '<hub id>'}"
            )
        adapter = require_adapter(
            artifacts.get(ADAPTER_ARTIFACT), "the model was logged without its LoRA adapter; re-register it with "
            "`visiontune register` after `visiontune train`")
        model, processor = FastVisionModel.from_pretrained(
            base, dtype=config.get("dtype"), use_gradient_checkpointing=False, use_fused_kernels=False,
        )
        processor = adapter_processor(adapter, processor)
        self.model = FastVisionModel.for_inference(PeftModel.from_pretrained(model, str(adapter)))
        self.processor = processor
        self.config = config
        self.rule = ImageRule.from_mapping(config)

    def predict(self, context, model_input: pd.DataFrame,  # noqa: ANN001
                params: Optional[dict[str, Any]] = None) -> list[str]:
        """One greedy answer per input row (see the module docstring for the input format).

        ``model_input`` is what MLflow hands over after enforcing the logged signature: a DataFrame. MLflow
        derives no schema from that hint (a ``list[...]`` hint would replace the signature) and, hinted,
        no longer warns "Add type hints to the `predict` method" at every ``log_model``.
        """
        params = params or {}
        root, limit = self.config.get("image_root"), int(self.config.get("max_pixels") or MAX_PIXELS)
        samples = _build_samples(model_input, self.config.get("instruction"),
                                 lambda v: open_served_image(v, root, limit))
        return generate_answers(
            self.model, self.processor, samples,
            max_new_tokens=int(params.get("max_new_tokens") or self.config.get("max_new_tokens", 64)),
            batch_size=int(self.config.get("batch_size", 8)), rule=self.rule, progress=False,
        )


def encode_image(path: str | Path) -> str:
    """Base64 text of an image file: the ``image`` value for JSON serving requests."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def example_image_b64(size: tuple[int, int] = (56, 56)) -> str:
    """A small gray PNG as base64 (the logged input example; real images work the same way)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (128, 128, 128)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def model_signature(max_new_tokens: int) -> Any:
    """Input columns image (string: base64, or a path under image_root) and optional prompt (string); output
    strings; param max_new_tokens."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "prompt", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", int(max_new_tokens))]),
    )
