"""DOP policies inside vLLM (docs/serving.md).

vLLM loads this package's :func:`register` in every process through the
``vllm.general_plugins`` entry point. It only points vLLM's architectures that dop knows
(LLaVA first) at dop's subclasses of vLLM's own model classes; those behave exactly as
vLLM's classes unless the engine is started with a policy::

    vllm serve MODEL --enforce-eager --additional-config '{"dop": {"policy": "policy.json"}}'

(``dop serve --model MODEL --policy policy.json`` does the same). Nothing here imports vLLM
or torch until vLLM asks for a model class.
"""

from __future__ import annotations

from .options import ServingOptions, options_from_additional_config, read_serving_policy

# vLLM architecture name -> dop's class for it, "module:Class" so vLLM imports it lazily
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "dop.serving.llava:DopLlavaForConditionalGeneration",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point (may run more than once per process)."""
    from vllm import ModelRegistry  # heavy: vLLM, an optional extra; only vLLM's processes call this

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)


__all__ = ["ARCHITECTURES", "ServingOptions", "options_from_additional_config", "read_serving_policy", "register"]
