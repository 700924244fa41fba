"""The peers of `ragd-pipe bench encoder`, on the same workload, as its `--compare-json` file.

PyTorch (through sentence-transformers) times the training step `bench encoder` times: one
batch of PAIRS (anchor, positive) pairs of exactly TOKENS tokens, MultipleNegativesRankingLoss
(cosine x 20) and AdamW at lr 2e-5, dropout on; the median of --steps steps after one warm-up,
and the step's peak resident memory (Linux's VmHWM, reset before the steps as ours is). Both
PyTorch and ONNX Runtime (the model exported from PyTorch, fp32, and dynamically quantized to
int8, the CPU path sentence-transformers recommends) encode --sentences texts in batches of
2 x PAIRS. The texts are built as `bench encoder` builds them (src/model/bench.rs), and the
script checks they tokenize to TOKENS. ONNX Runtime's int8 embeddings are compared with
PyTorch's fp32 ones (lowest cosine), since speed bought with accuracy is no like-for-like win.

    pip install torch sentence-transformers onnxruntime onnx
    python examples/bench/peers.py MODEL_DIR --shapes 16x128,32x256 > peers.json
    ragd-pipe bench encoder --compare-json peers.json

Run both on the same idle machine, alternately a few times (the medians are what count).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

WORDS = ["alpha", "river", "stone", "cloud", "table", "music", "green", "light"]


def texts_of_length(count, tokens):
    return [
        " ".join(WORDS[(i + j * 3 + j // 8) % len(WORDS)] for j in range(tokens - 2))
        for i in range(count)
    ]


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def log(message):
    print(message, file=sys.stderr, flush=True)


def pytorch(model_dir, pairs, tokens, steps, sentences):
    import torch
    from sentence_transformers import SentenceTransformer, losses

    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = max(model.max_seq_length, tokens)
    texts = texts_of_length(max(sentences, 2 * pairs), tokens)
    lengths = {len(ids) for ids in model.tokenizer(texts)["input_ids"]}
    if lengths != {tokens}:
        raise SystemExit(f"the texts tokenize to {sorted(lengths)} tokens, not {tokens}")
    loss = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    anchors = model.tokenize(texts[:pairs])
    positives = model.tokenize(texts[pairs : 2 * pairs])
    model.train()
    times = []
    reset_peak_rss()
    for step in range(steps + 1):
        start = time.perf_counter()
        value = loss([anchors, positives], None)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - start)
            log(f"pytorch {pairs}x{tokens}: step {step}: {times[-1]:.3f} s")
    peak = peak_rss()
    model.eval()
    batch = 2 * pairs
    model.encode(texts[:batch], batch_size=batch)
    start = time.perf_counter()
    embeddings = model.encode(texts, batch_size=batch, normalize_embeddings=True)
    per_second = len(texts) / (time.perf_counter() - start)
    log(f"pytorch {pairs}x{tokens}: {per_second:.1f} sentences/s")
    return model, texts, embeddings, {
        "step_seconds": statistics.median(times),
        "sentences_per_second": per_second,
        "peak_bytes": peak,
    }


def onnx_runtime(model, texts, reference, pairs, tokens, threads, workdir):
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class Hidden(torch.nn.Module):
        """The transformer's last hidden state, taking its inputs by name."""

        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids).last_hidden_state

    transformer = Hidden(model[0].auto_model.eval())
    # Each shape's PyTorch run trains its own copy: export the weights it encoded with.
    fp32 = os.path.join(workdir, f"model-{pairs}x{tokens}.onnx")
    int8 = os.path.join(workdir, f"model-{pairs}x{tokens}-int8.onnx")
    if not os.path.exists(fp32):
        sample = model.tokenizer(texts[:2], padding=True, return_tensors="pt")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        dynamic = {name: {0: "batch", 1: "tokens"} for name in names}
        dynamic["last_hidden_state"] = {0: "batch", 1: "tokens"}
        with torch.no_grad():
            torch.onnx.export(
                transformer,
                tuple(sample[name] for name in names),
                fp32,
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes=dynamic,
                opset_version=17,
                dynamo=False,
            )
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    batch = 2 * pairs
    figures = {}
    for label, path in (("onnxruntime-fp32", fp32), ("onnxruntime-int8", int8)):
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        def encode(chunk):
            features = model.tokenizer(chunk, padding=True, truncation=True,
                                       max_length=tokens, return_tensors="np")
            inputs = {i.name: features[i.name].astype(np.int64) for i in session.get_inputs()}
            hidden = session.run(None, inputs)[0]
            mask = features["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
            return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

        encode(texts[:batch])
        start = time.perf_counter()
        rows = np.concatenate([encode(texts[i : i + batch]) for i in range(0, len(texts), batch)])
        per_second = len(texts) / (time.perf_counter() - start)
        cosine = float((rows * reference).sum(1).min())
        log(f"{label} {pairs}x{tokens}: {per_second:.1f} sentences/s, "
            f"lowest cosine to PyTorch fp32 {cosine:.6f}")
        figures[label] = {"sentences_per_second": per_second}
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--shapes", default="16x128,32x256")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sentences", type=int, default=320)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peers = {}
    with tempfile.TemporaryDirectory() as workdir:
        for shape in args.shapes.split(","):
            pairs, tokens = (int(part) for part in shape.split("x"))
            model, texts, reference, figures = pytorch(
                args.model_dir, pairs, tokens, args.steps, args.sentences)
            peers.setdefault(f"pytorch-{torch.__version__}", {})[shape] = figures
            if not args.no_onnx:
                for label, figures in onnx_runtime(
                        model, texts, reference, pairs, tokens, args.threads, workdir).items():
                    peers.setdefault(label, {})[shape] = figures
    json.dump(peers, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
