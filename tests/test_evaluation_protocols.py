"""Issue-level evaluation: perplexity protocols, lm-eval zero-shot on local task YAMLs, MACs / KV bytes, report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_head_dims import grouped_plan, masked_and_sliced

from prunekit.errors import ParamsError, PrunekitError
from prunekit.evaluation.datasets import PPL_DATASETS, PplText, metric_name, read_local_rows
from prunekit.evaluation.efficiency import efficiency, layer_costs
from prunekit.evaluation.perplexity import perplexity_table
from prunekit.evaluation.report import build_report, changed_params, parse_exp_show
from prunekit.evaluation.zeroshot import HUB_TASKS, LOCAL_FORMATS, auto_mc_rows, zero_shot
from prunekit.models.compat import cache_of
from prunekit.models.families import adapter_for
from prunekit.pipeline.params import parse_params
from prunekit.pipeline.validation import check_choices

DATA = Path(__file__).parent / "data"

# ------------------------------------------------------------------ perplexity protocols

WIKI_RAW = (
    " = Title = \n\n The first paragraph of the article , with tokens . \n\n = = Section = = \n\n More text here .\n"
)


def _nll_by_hand(model, ids: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Sum of NLL over non-overlapping chunks, each token but the first predicted from the chunk start."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - seq_len + 1, seq_len):
            row = ids[start : start + seq_len]
            logp = torch.log_softmax(model(input_ids=row[None]).logits[0].double(), dim=-1)
            total -= logp[torch.arange(seq_len - 1), row[1:]].sum().item()
            count += seq_len - 1
    return total, count


def test_local_wikitext_file_perplexity_equals_independent_computation(tmp_path: Path, tokenizer) -> None:
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(WIKI_RAW * 6)
    rows = read_local_rows(PPL_DATASETS["wikitext2"], raw)
    # The Hub's wikitext rows: each line, non-empty ones with their line end, empty ones as "".
    assert rows[:3] == [" = Title = \n", "", " The first paragraph of the article , with tokens . \n"]
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    assert read_local_rows(PPL_DATASETS["wikitext2"], jsonl) == rows  # the same rows from the Hub-format jsonl

    model = tiny_model(vocab_size=len(tokenizer))
    got = perplexity_table(model, tokenizer, [PplText("wikitext2", "test", rows)], [16, 32], batch_size=3)
    assert sorted(got) == ["wikitext2-test-16", "wikitext2-test-32"]
    ids = torch.tensor(tokenizer("\n\n".join(rows))["input_ids"])  # joined with "\n\n", tokenized once
    for seq_len in (16, 32):
        nll, n = _nll_by_hand(model, ids, seq_len)
        m = got[f"wikitext2-test-{seq_len}"]
        assert m["tokens"] == n == (ids.numel() // seq_len) * (seq_len - 1)
        assert m["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-6)


def test_ptb_join_and_metric_names(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "ptb.valid.txt"
    path.write_text(" the cat sat on the mat \n a dog ran home \n" * 20)
    rows = read_local_rows(PPL_DATASETS["ptb"], path)
    assert rows[:2] == ["the cat sat on the mat", "a dog ran home"]
    model = tiny_model(vocab_size=len(tokenizer))
    both = perplexity_table(
        model, tokenizer, [PplText("ptb", "validation", rows), PplText("ptb", "validation", rows, " ")], [16], 4
    )
    assert sorted(both) == ["ptb-validation-16", "ptb-validation-16-join_space"]
    assert both["ptb-validation-16"]["ppl"] != both["ptb-validation-16-join_space"]["ppl"]
    assert metric_name("c4", "validation", 2048) == "c4-validation-2048"


def test_local_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "c4.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(PrunekitError, match=r"has no 'text' column \(got \['content'\]\)"):
        read_local_rows(PPL_DATASETS["c4"], bad)
    raw = {"evaluate": {"local_files": {"c4": str(tmp_path / "missing.jsonl")}, "perplexity": ["default", "c4"]}}
    with pytest.raises(ParamsError, match=r"evaluate.local_files.c4': '.*missing.jsonl' not found"):
        check_choices(parse_params(raw))
    with pytest.raises(ParamsError, match=r"evaluate.local_files.wiki': no local copy is read for 'wiki'"):
        check_choices(parse_params({"evaluate": {"local_files": {"wiki": str(bad)}}}))
    with pytest.raises(ParamsError, match=r"evaluate.seq_lens': give lengths >= 2"):
        check_choices(parse_params({"evaluate": {"seq_lens": []}}))


def test_agrees_with_lm_eval_rolling_loglikelihood_up_to_chunk_boundaries(tokenizer) -> None:
    """lm-eval's ``loglikelihood_rolling`` on each of our chunks (as text, window = chunk length) predicts every
    token of the chunk after an EOS prefix token; we predict all but the first, with no prefix. Prepending that
    one boundary token to every chunk turns our computation into lm-eval's exactly: the two protocols differ
    by the chunk-boundary token and nothing else."""
    from pydoc_data.topics import topics

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from prunekit.evaluation.perplexity import perplexity

    model = tiny_model(vocab_size=len(tokenizer))
    seq_len = 24
    ids = torch.tensor(tokenizer(topics["if"] + topics["while"])["input_ids"])
    chunked = ids[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len)[:6]
    texts = [tokenizer.decode(row) for row in chunked]
    assert all(tokenizer(t)["input_ids"] == row.tolist() for t, row in zip(texts, chunked, strict=True))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=seq_len)
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    theirs = -sum(lm.loglikelihood_rolling(reqs, disable_tqdm=True))
    with_boundary = torch.cat([torch.full((chunked.shape[0], 1), lm.prefix_token_id), chunked], dim=1)
    ours = perplexity(model, with_boundary, batch_size=4)
    assert ours["tokens"] == chunked.numel()
    assert theirs == pytest.approx(ours["nll"] * ours["tokens"], rel=1e-6)
    plain = perplexity(model, chunked, batch_size=4)  # the protocol itself: one token fewer per chunk
    assert plain["tokens"] == chunked.numel() - chunked.shape[0]


# ------------------------------------------------------------------ zero-shot

LOCAL_ROWS = {
    "boolq": [
        {"question": "is the sky blue", "passage": "The sky is blue on a clear day.", "label": 1},
        {"question": "is fire cold", "passage": "Fire is hot.", "label": 0},
        {"question": "do fish swim", "passage": "Fish live in water.", "label": 1},
    ],
    "piqa": [
        {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
        {"goal": "Dry hands", "sol1": "Use water.", "sol2": "Use a towel.", "label": 1},
        {"goal": "Cut paper", "sol1": "Use scissors.", "sol2": "Use soup.", "label": 0},
    ],
    "hellaswag": [
        {
            "activity_label": "Cooking",
            "ctx_a": "A man cuts onions.",
            "ctx_b": "he",
            "endings": ["puts them in a pan.", "flies [title] away.", "sings.", "sleeps."],
            "label": "0",
        },
        {
            "activity_label": "Sports",
            "ctx_a": "A girl kicks a ball.",
            "ctx_b": "the ball",
            "endings": ["melts.", "rolls into the goal.", "talks.", "reads."],
            "label": "1",
        },
    ],
    "winogrande": [
        {"sentence": "The cup fell off the table as _ was bad.", "option1": "cup", "option2": "table", "answer": "2"},
        {"sentence": "Anna thanked Maria because _ was kind.", "option1": "Anna", "option2": "Maria", "answer": "1"},
    ],
    "arc_easy": [
        {
            "question": "Water is?",
            "choices": {"text": ["wet", "iron", "dry"], "label": ["A", "B", "C"]},
            "answerKey": "A",
        },
        {"question": "A planet?", "choices": {"text": ["Moon", "Mars"], "label": ["A", "B"]}, "answerKey": "B"},
    ],
    "arc_challenge": [
        {"question": "Plants take?", "choices": {"text": ["oxygen", "CO2"], "label": ["1", "2"]}, "answerKey": "2"},
    ],
    "openbookqa": [
        {"question_stem": "The sun is", "choices": {"text": ["a star", "rock"], "label": ["A", "B"]}, "answerKey": "A"},
    ],
}


def _hellaswag_clean(text: str) -> str:
    import re

    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _requests(task: str, row: dict) -> tuple[list[tuple[str, str]], int, list[str]]:
    """(context, continuation) per choice, the gold index and the choice strings: lm-eval's prompts, by hand."""
    if task == "boolq":
        ctx = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        return [(ctx, " no"), (ctx, " yes")], row["label"], ["no", "yes"]
    if task == "piqa":
        ctx, ch = f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]]
        return [(ctx, " " + c) for c in ch], row["label"], ch
    if task == "hellaswag":
        ctx = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        ch = [_hellaswag_clean(e) for e in row["endings"]]
        return [(ctx, " " + c) for c in ch], int(row["label"]), ch
    if task == "winogrande":
        i = row["sentence"].index("_")
        rest = " " + row["sentence"][i + 1 :].strip()
        ctxs = [row["sentence"][:i] + o for o in (row["option1"], row["option2"])]
        return [(c, rest) for c in ctxs], int(row["answer"]) - 1, [rest, rest]
    stem = row["question_stem"] if task == "openbookqa" else f"Question: {row['question']}\nAnswer:"
    ch = row["choices"]["text"]
    return [(stem, " " + c) for c in ch], row["choices"]["label"].index(row["answerKey"]), ch


def _loglik(model, tokenizer, context: str, continuation: str) -> float:
    ctx, whole = tokenizer(context)["input_ids"], tokenizer(context + continuation)["input_ids"]
    cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else tokenizer(continuation)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def _expected_acc(model, tokenizer, task: str, rows: list[dict]) -> dict[str, float]:
    acc, acc_norm = [], []
    for row in rows:
        reqs, gold, choices = _requests(task, row)
        ll = [_loglik(model, tokenizer, c, t) for c, t in reqs]
        acc.append(float(max(range(len(ll)), key=ll.__getitem__) == gold))
        norm = [v / len(c.encode()) for v, c in zip(ll, choices, strict=True)]
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == gold))
    out = {"acc": sum(acc) / len(acc)}
    if "acc_norm" in HUB_TASKS[task][2]:
        out["acc_norm"] = sum(acc_norm) / len(acc_norm)
    return out


@pytest.fixture(scope="module")
def zs_model_and_results(tmp_path_factory, tokenizer):
    local = tmp_path_factory.mktemp("tasks")
    for task, rows in LOCAL_ROWS.items():
        (local / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_model(seed=3, vocab_size=len(tokenizer))
    from pydoc_data.topics import topics

    auto = auto_mc_rows([topics[k] for k in sorted(topics)][:40], 6, 3, 12, 4, seed=5)
    tasks = ["auto_mc", *LOCAL_ROWS]
    results = zero_shot(model, tokenizer, tasks, local_dir=str(local), auto_rows=auto, batch_size=4)
    return model, auto, results


def test_local_task_yamls_equal_independent_log_likelihoods(zs_model_and_results, tokenizer) -> None:
    model, _, results = zs_model_and_results
    assert set(LOCAL_FORMATS) == set(HUB_TASKS) == set(LOCAL_ROWS)
    for task, rows in LOCAL_ROWS.items():
        expected = _expected_acc(model, tokenizer, task, rows)
        got = {k: v for k, v in results[task].items() if not k.endswith("_stderr")}
        assert got == pytest.approx(expected, abs=1e-4), task  # reported to 4 decimals
    tasks = ["auto_mc", *LOCAL_ROWS]
    for metric in ("acc", "acc_norm"):
        values = [results[t][metric] for t in tasks if metric in results[t]]
        assert results["average"][metric] == pytest.approx(sum(values) / len(values), abs=1e-4)
    assert "acc_norm" not in results["boolq"] and "acc_norm" not in results["winogrande"]


def test_auto_mc_rows_and_accuracy(zs_model_and_results, tokenizer) -> None:
    model, auto, results = zs_model_and_results
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)][:40]
    assert auto == auto_mc_rows(docs, 6, 3, 12, 4, seed=5)  # seeded
    for row in auto:
        truth = row["choices"][row["label"]]
        assert len(row["context"].split()) == 12 and all(len(c.split()) == 4 for c in row["choices"])
        assert len(set(row["choices"])) == 3
        # The true continuation follows the context in one document; the distractors come from others.
        assert sum((row["context"] + " " + truth) in " ".join(d.split()) for d in docs) >= 1
    acc = []
    for row in auto:
        ll = [_loglik(model, tokenizer, row["context"], " " + c) for c in row["choices"]]
        acc.append(float(max(range(3), key=ll.__getitem__) == row["label"]))
    assert results["auto_mc"]["acc"] == pytest.approx(sum(acc) / len(acc), abs=1e-4)


def test_zero_shot_errors(tmp_path: Path) -> None:
    (tmp_path / "piqa.jsonl").write_text("{}\n")
    raw = {"evaluate": {"zero_shot": {"tasks": ["piqa", "boolq"], "local_dir": str(tmp_path)}}}
    with pytest.raises(ParamsError, match=r"lacks boolq.jsonl; .*boolq: \{\"question\""):
        check_choices(parse_params(raw))
    with pytest.raises(ParamsError, match=r"unknown zero-shot task 'hellaswg'. Did you mean 'hellaswag'"):
        check_choices(parse_params({"evaluate": {"zero_shot": {"tasks": ["hellaswg"]}}}))
    with pytest.raises(PrunekitError, match="auto_mc needs documents of at least 20 words"):
        auto_mc_rows(["too short"], 3, 2, 12, 8, seed=0)


# ------------------------------------------------------------------ efficiency


def test_macs_and_kv_bytes_of_a_heterogeneous_pruned_model() -> None:
    dense = tiny_model(num_hidden_layers=3, vocab_size=160)
    units = ["attn_kv_group", "mlp_channel", "attn_qk_dim", "attn_vo_dim"]
    plan = grouped_plan(dense, units, seed=1)
    _, model = masked_and_sliced(dense, plan)
    adapter = adapter_for(model.config)
    h, vocab = 48, 160
    macs, attn, kv = 0, 0, 0
    for idx in range(3):  # by hand from the plan's kept counts (4 k/v heads x 2 queries, head_dim 8)
        n_kv = len(plan.keep["attn_kv_group"][idx])
        # head-dim units are counted per k/v head of the dense model; rotary pairs hold 2 q/k dims
        d_qk = 2 * len(plan.keep["attn_qk_dim"][idx]) // 4
        d_v = len(plan.keep["attn_vo_dim"][idx]) // 4
        m = len(plan.keep["mlp_channel"][idx])
        n_q = 2 * n_kv
        macs += h * n_q * d_qk + h * n_kv * d_qk + h * n_kv * d_v + n_q * d_v * h + 3 * h * m
        attn += n_q * (d_qk + d_v)
        kv += n_kv * (d_qk + d_v) * 4
    assert len({(c.linear, c.attention_per_context) for c in layer_costs(model, adapter)}) == 3  # heterogeneous
    got = efficiency(model, adapter, [16])
    assert got["linear_macs_per_token"] == macs + h * vocab
    assert got["attention_macs_per_context_token"] == attn
    assert got["macs_per_token_at_16"] == macs + h * vocab + attn * 17 / 2
    assert got["kv_cache_bytes_per_token"] == kv
    # Independently: every Linear's in x out is its MACs per token; the real cache holds kv bytes per token.
    linear = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))
    assert got["linear_macs_per_token"] == linear
    with torch.no_grad():
        cache = cache_of(model(input_ids=torch.randint(0, vocab, (2, 9)), use_cache=True))
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == kv * 2 * 9


# ------------------------------------------------------------------ report


def test_report_from_two_experiments(tmp_path: Path) -> None:
    entries = json.loads((DATA / "exp_show.json").read_text())
    rows, skipped = parse_exp_show(entries)
    assert [r.name for r in rows] == ["main", "crit-lora", "crit-bip"] and skipped == ["crit-param_mix"]
    assert changed_params(rows) == ["score.criterion"]
    text = build_report(entries, tmp_path / "r" / "experiments.md")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| experiment | score.criterion | removed | dense ppl | dense acc | pruned ppl")
    main = rows[0].metrics["metrics/eval/recovered.json"]
    assert table[1].split(" | ")[:3] == ["| main", "param_first", f"{rows[0].fraction():.4g}"]
    assert f"{main['ppl']:.4g}" in table[1]
    assert "crit-param_mix" in text.split("Without metrics")[1]
    assert (tmp_path / "r" / "experiments.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(PrunekitError, match="not `dvc exp show --json` output"):
        parse_exp_show({"rev": "x"})
    # The report knows metrics files by content, not by path: declared elsewhere, the same table.
    moved = (DATA / "exp_show.json").read_text().replace("metrics/eval/", "out/").replace("metrics/prune", "out/cut")
    elsewhere = build_report(json.loads(moved), tmp_path / "m" / "experiments.md")
    assert [ln for ln in elsewhere.splitlines() if ln.startswith("| ")] == table


def test_hub_tasks_reach_the_network_boundary(monkeypatch: pytest.MonkeyPatch, tokenizer) -> None:
    """Without local copies a hub task is lm-eval's own (piqa -> its Hub dataset); offline that fails with
    the fix in the message, not a traceback from deep inside lm-eval."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = tiny_model(vocab_size=len(tokenizer))
    with pytest.raises(PrunekitError, match=r"could not load the tasks \['piqa'\].*baber/piqa.*local_dir"):
        zero_shot(model, tokenizer, ["piqa"], batch_size=2)


def test_report_marks_the_metrics_an_experiment_only_carries(tmp_path: Path) -> None:
    """An experiment that reran only the pruned model's stages still carries the recovered model's evaluation of an
    earlier run: its digest of the params is not the experiment's, so the report marks it and leaves it off the
    plot; the pruned model's, made with the experiment's params, stands unmarked. The Prefect artifact names the
    plot's path instead of an image it cannot show."""
    from prunekit.evaluation.made_with import made_with
    from prunekit.evaluation.report import markdown, with_plot_path

    def digest(raw: dict, model: str) -> str:
        return made_with(parse_params(raw).model_dump(mode="json"), model)

    base, changed = {"prune": {"target": 0.2}}, {"prune": {"target": 0.3}}
    evaluation = {"params": 100, "ppl.python-docs.test.128": 30.0, "zero_shot.average.acc": 0.5}

    def rev(name: str, raw: dict, recovered_from: dict) -> dict:
        metrics = {
            "metrics/prune.json": {"data": {"achieved_fraction": raw["prune"]["target"]}},
            "metrics/eval/pruned.json": {"data": {**evaluation, "made_with": digest(raw, "pruned")}},
            "metrics/eval/recovered.json": {"data": {**evaluation, "made_with": digest(recovered_from, "recovered")}},
        }
        return {"rev": name, "name": name, "data": {"params": {"params.yaml": {"data": raw}}, "metrics": metrics}}

    entries = [{**rev("main", base, base), "experiments": [{"revs": [rev("partial", changed, base)]}]}]
    rows, _ = parse_exp_show(entries)
    assert [(r.name, r.produced("pruned"), r.produced("recovered")) for r in rows] == [
        ("main", True, True),
        ("partial", True, False),
    ]
    text = markdown(rows, [], "experiments.png")
    partial = next(line for line in text.splitlines() if line.startswith("| partial"))
    assert partial.endswith("| 30 | 0.5 | 30* | 0.5* |") and "not produced by this experiment" in text
    assert "![" not in with_plot_path(text, tmp_path / "experiments.png")
    assert f"The plot: `{tmp_path / 'experiments.png'}`" in with_plot_path(text, tmp_path / "experiments.png")
