"""Builds train.jsonl and heldout.jsonl (ragd's training-data format) from examples/labelled.

Documents are split: every fifth document (sorted by path) is held out. Training examples are the
labelled user questions whose answer lies in a training document, plus section headings as
queries for their section's text (query-gen's `headings` strategy), 64 in all; each gets the two
sections of other training documents sharing the most words with its answer as hard negatives.
The held-out set is the same kinds of pairs from the held-out documents, without negatives.

Run from the repository root: python3 examples/train/make_train_data.py
"""

import json
import random
import re
from collections import defaultdict

corpus = [json.loads(line) for line in open("examples/labelled/corpus.jsonl")]
queries = {q["_id"]: q["text"] for q in map(json.loads, open("examples/labelled/queries.jsonl"))}
qrels = [line.rstrip("\n").split("\t") for line in open("examples/labelled/qrels/test.tsv")][1:]

by_id = {c["_id"]: c for c in corpus}
document = lambda cid: cid.split("#")[0]
docs = sorted({document(c["_id"]) for c in corpus})
heldout_docs = set(docs[4::5])


def words(text):
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def negatives(cid, pool):
    answer = words(by_id[cid]["text"])
    scored = sorted(
        (c for c in pool if document(c["_id"]) != document(cid)),
        key=lambda c: (-len(answer & words(c["text"])), c["_id"]),
    )
    return [{"id": c["_id"], "text": f'{c["title"]} {c["text"]}'} for c in scored[:2]]


def pairs(held):
    wanted = lambda cid: (document(cid) in heldout_docs) == held
    pool = [c for c in corpus if wanted(c["_id"])]
    questions = [(queries[q], cid) for q, cid, _ in qrels if wanted(cid)]
    headings = [(c["title"], c["_id"]) for c in pool]
    return pool, questions, headings


def record(query, cid, pool, with_negatives):
    c = by_id[cid]
    return {
        "query": query,
        "positive": c["text"],
        "positive_id": cid,
        "negatives": negatives(cid, pool) if with_negatives else [],
        "source_document": document(cid),
    }


rng = random.Random(0)
pool, questions, headings = pairs(held=False)
rng.shuffle(headings)
train = [record(q, cid, pool, True) for q, cid in questions]
train += [record(q, cid, pool, True) for q, cid in headings[: 64 - len(train)]]
rng.shuffle(train)

pool, questions, headings = pairs(held=True)
heldout = [record(q, cid, pool, False) for q, cid in questions + headings]

for name, records in [("train", train), ("heldout", heldout)]:
    with open(f"examples/train/{name}.jsonl", "w") as out:
        for r in records:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(name, len(records), "examples from", len({r["source_document"] for r in records}), "documents")
