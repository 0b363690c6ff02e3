"""The sampled CPU grid both stacks' tests draw from (tests/test_calc_stack_hf.py for transformers +
peft + bitsandbytes, tests/test_calc_activations.py for reference_models + minilora): each test
runs every family x method and lets Hypothesis draw the rest of a bench/stack_cases.Case."""
from dataclasses import replace

from hypothesis import strategies as st

from bench.stack_cases import PRECISIONS, SHAPES, Case, as_accepted, with_shape

cases = st.builds(dict, ckpt=st.booleans(), attn=st.sampled_from(["sdpa", "eager"]),
                  precision=st.sampled_from(PRECISIONS), dropout=st.booleans(), shape=st.sampled_from(SHAPES),
                  adapter_fp32=st.booleans(), lora_dropout=st.sampled_from([0.0, 0.1]), use_cache=st.booleans())


def case_of(stack: str, family: str, method: str, drawn: dict) -> Case:
    precision = drawn["precision"]
    if method.startswith("qlora") and precision == "fp32+autocast":
        precision = "bf16"   # QLoRA computes in its compute dtype; autocast is drawn for the others
    case = Case(stack, family, method, drawn["ckpt"], drawn["attn"], precision, drawn["dropout"],
                use_cache=drawn["use_cache"])
    if method != "full":   # minilora has no autocast_adapter_dtype: its adapters take the base dtype
        case = replace(case, adapter_fp32=drawn["adapter_fp32"] or stack == "minilora",
                       lora_dropout=drawn["lora_dropout"])
    return as_accepted(with_shape(case, drawn["shape"]))
