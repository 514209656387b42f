"""Fresh-process check: load Hugging Face directories with transformers only and save their logits
(fp32 and fp64), keyed by (dir, dtype).

    python hf_logits_worker.py TOKENS.pt OUT.pt DIR [DIR ...]
"""

import sys

import torch
from transformers import AutoModelForCausalLM


def main():
    tokens = torch.load(sys.argv[1])
    out = {}
    for d in sys.argv[3:]:
        for dtype in (torch.float32, torch.float64):  # fp64: the reference for fp32 rounding noise
            model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
            with torch.no_grad():
                out[(d, str(dtype))] = model(tokens).logits
    torch.save(out, sys.argv[2])


if __name__ == "__main__":
    main()
