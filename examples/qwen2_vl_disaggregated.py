"""Qwen2-VL split in two by embedlink, and the same answer as the whole model.

    pip install 'embedlink[examples]'
    python examples/qwen2_vl_disaggregated.py [--dtype bfloat16] [--new-tokens 8]

An encoder process runs the model's processor and vision tower on three
images and sends, per request, one embedding row per prompt token (the
vision tower's output at the image tokens), the token ids and the M-RoPE
positions, with ``mrope_position_delta`` in the aux record. A language
process receives them (its first reservation, 256 tokens, is too small for
the two larger images, so their rooms resume), builds ``inputs_embeds`` and
runs prefill and greedy decoding with the model's own forward. This process
runs the whole model on the same prompts and compares: the same tokens, and
the same logits, bit for bit.

The model is transformers' ``Qwen2VLForConditionalGeneration`` at a tiny
size with seeded random weights (``embedlink.examples.qwen_vl``, which also
builds the processor and a small tokenizer in code): nothing is downloaded.
``embedlink demo --model qwen2-vl-tiny`` is the fuller version (more images,
both dtypes, several rooms in flight, a table).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

import torch

from embedlink import BootstrapServer, EncoderEndpoint, LanguageEndpoint, Status
from embedlink.examples.images import draw
from embedlink.examples.qwen_vl import TinyVL

PROMPT = (
    "<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> describe this image "
    "<|im_end|> <|im_start|> assistant"
)
# (width, height) in pixels: 64, 270 and 768 image tokens after the processor's resize
IMAGES = [(229, 229), (509, 425), (901, 677)]
THREADS = 1  # the same in every process: how work is split among threads can change rounding


def encoder(bootstrap: str, dtype: str, done: mp.Queue) -> None:
    torch.set_num_threads(THREADS)
    vl = TinyVL("qwen2-vl-tiny", dtype, "encoder")  # processor + vision tower only
    with EncoderEndpoint(vl.schema(), bootstrap=bootstrap, num_blocks=64, block_size=64) as ep:
        senders = []
        for room, (w, h) in enumerate(IMAGES):
            encoded = vl.encode(PROMPT, [draw(w, h, 0, room, 0)])
            # embedding [n, 128], token_ids [n], mrope_positions [3, n], mrope_position_delta
            tx = ep.sender(room)
            tx.send(encoded.embedding)
            senders.append(tx)
        done.put([int(tx.wait(60)) for tx in senders])


def language(bootstrap: str, dtype: str, new_tokens: int, out: mp.Queue) -> None:
    torch.set_num_threads(THREADS)
    vl = TinyVL("qwen2-vl-tiny", dtype, "language")  # the language model only
    with LanguageEndpoint(vl.schema(), num_blocks=64, block_size=64, default_tokens=256) as ep:
        receivers = [ep.receiver(bootstrap=bootstrap, room=room) for room in range(len(IMAGES))]
        for rx in receivers:  # all three rooms are in flight at once
            emb = rx.wait(timeout=60)
            resumed = [t for s, t in rx.history if s == Status.Transferring]
            rx.clear()
            # inputs_embeds from the arrived rows, positions as they came
            gen = vl.generate_from_arrived(emb, new_tokens)
            out.put((rx.room, len(emb.token_ids), resumed, gen.tokens, gen.logits))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    done, out = ctx.Queue(), ctx.Queue()
    with BootstrapServer(host="127.0.0.1", port=0) as boot:
        procs = [
            ctx.Process(target=encoder, args=(boot.address, args.dtype, done)),
            ctx.Process(target=language, args=(boot.address, args.dtype, args.new_tokens, out)),
        ]
        for p in procs:
            p.start()
        # meanwhile, the reference: the whole model in this process
        torch.set_num_threads(THREADS)
        whole = TinyVL("qwen2-vl-tiny", args.dtype, "whole")
        refs = [
            whole.generate_monolithic(PROMPT, [draw(w, h, 0, room, 0)], args.new_tokens)
            for room, (w, h) in enumerate(IMAGES)
        ]
        arrived = [out.get(timeout=120) for _ in IMAGES]
        statuses = done.get(timeout=120)
        for p in procs:
            p.join(30)

    differences = 0
    for room, n, resumed, tokens, logits in sorted(arrived, key=lambda a: a[0]):
        ref = refs[room]
        same_logits = all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for a, b in zip(logits, ref.logits, strict=True)
        )
        same = same_logits and tokens == ref.tokens
        differences += not same
        w, h = IMAGES[room]
        print(
            f"room {room}: {w}x{h} px, {n} prompt tokens"
            f"{f', resumed at {resumed}' if resumed else ''}\n"
            f"  disaggregated {tokens}\n  monolithic    {ref.tokens}\n"
            f"  logits (prefill + {len(logits) - 1} decode steps) "
            f"{'bitwise equal' if same_logits else 'DIFFER'}"
        )
    print(f"encoder rooms: {[Status(s).name for s in statuses]}; {args.dtype}")
    return 1 if differences else 0


if __name__ == "__main__":
    raise SystemExit(main())
