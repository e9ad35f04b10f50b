"""Run from the checkout's root (``python -m tests.hf_root_probe`` or ``-c``): load an export as a user does.

Prints JSON: where ``kernels`` and ``megatron_glm.kernels`` came from, and transformers' greedy fill
of a blank. The root's ``kernels/`` folder is on ``sys.path`` here, as it is for any command run there.
"""

import json
import sys


def main(hf: str, prompt: str, new: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf, trust_remote_code=True)
    inputs = tokenizer(prompt + "[sop]", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=new + 1, do_sample=False)[
        0, inputs["input_ids"].shape[1] :
    ]
    fill = tokenizer.decode([t for t in out.tolist() if t != tokenizer.eop_token_id][:new])

    import kernels

    from megatron_glm import kernels as ours

    print(
        json.dumps(
            {
                "path0": sys.path[0],
                "fill": fill,
                "kernels": kernels.__file__,
                "has_CUDAProperties": hasattr(kernels, "CUDAProperties"),
                "ours": ours.__file__,
                "ours_has_flash": hasattr(ours, "flash_attention"),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
