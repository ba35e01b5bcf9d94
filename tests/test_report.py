"""HTML reports: the mask viewer and the sentiment report of a real (tiny) SparsePO run, rendered
in headless Chromium; the mask values shown are the ones compute_loss produces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
import yaml

from sparsepo_lite.cli import main
from sparsepo_lite.data import PreferenceCollator, tokenize_dataset
from sparsepo_lite.eval.runs import load_run
from sparsepo_lite.eval.sentiment import Sentiment
from sparsepo_lite.eval.views import mask_lift, mask_pairs, sentiment_verdict
from sparsepo_lite.objective import LossConfig, compute_loss

from conftest import review_rows

pytestmark = pytest.mark.slow  # trains or runs real models, compiles, or starts processes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(path) -> str:
    """The DOM after Chromium has run the page's script (no network is needed: the page is self-contained)."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is required in CI (scripts/test.sh installs Debian's chromium)")
        pytest.skip("no Chromium here (apt-get install chromium)")
    res = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", f"file://{os.path.abspath(path)}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("report_run")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in review_rows(12)))
    cfg = {
        "model_name_or_path": tiny_dir,
        "train_file": str(d / "train.jsonl"),
        "output_dir": str(d / "run"),
        "loss_type": "sparsepo",
        "lora_r": 4,
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "mask_init_std": 0.3,
        "max_length": 32,
        "max_prompt_length": 16,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
    }
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    main(["train", str(d / "cfg.yaml")])
    return d


def test_load_run_restores_the_trained_adapter_and_masks(run_dir):
    from safetensors.torch import load_file

    model, tok, masks, cfg = load_run(str(run_dir / "run"))
    saved = load_file(str(run_dir / "run" / "adapter_model.safetensors"))
    named = dict(model.named_parameters())
    assert saved and any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    for k, v in saved.items():
        live = next(p for n, p in named.items() if n.replace(".default", "") == k)
        assert torch.equal(live.detach().cpu(), v), k
    assert masks is not None and cfg["loss_type"] == "sparsepo"
    with pytest.raises(FileNotFoundError, match="not a sparsepo-lite run directory"):
        load_run(str(run_dir))


def test_a_run_is_refused_on_a_base_model_changed_in_place(run_dir, tmp_path, caplog):
    """The run records its base's checksums: a copy of the same weights elsewhere loads, the same folder
    re-saved with other weights (same name, same config) does not, by eval-sentiment and inspect-masks
    alike (both read the run with load_run)."""
    from conftest import save_tiny_llama

    run = tmp_path / "run"
    shutil.copytree(run_dir / "run", run)
    config = yaml.safe_load((run / "sparsepo_config.yaml").read_text())
    base = save_tiny_llama(tmp_path / "base")  # the fixture's model, rebuilt from the same seed
    (run / "sparsepo_config.yaml").write_text(yaml.safe_dump({**config, "model_name_or_path": base}))
    assert load_run(str(run))[3]["model_name_or_path"] == base
    save_tiny_llama(tmp_path / "base", seed=1)
    with pytest.raises(
        ValueError, match=r"base_model.json: the base model .* has changed since this run trained on it"
    ):
        load_run(str(run))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in review_rows(2)))
    with pytest.raises(SystemExit, match="weights_sha256 is"):
        main(["inspect-masks", str(run), "--data", str(tmp_path / "pairs.jsonl"), "--pairs", "2"])
    # loaded in another dtype (a GPU run with dtype auto, read on the CPU): the bits cannot match, so
    # only the config is compared, with a warning
    (run / "sparsepo_config.yaml").write_text(
        yaml.safe_dump({**config, "model_name_or_path": base, "dtype": "bfloat16"})
    )
    with caplog.at_level("WARNING"):
        load_run(str(run))
    assert "its weights cannot be compared" in caplog.text


def test_mask_pairs_show_the_masks_compute_loss_uses(run_dir):
    model, tok, masks, _ = load_run(str(run_dir / "run"))
    examples, _ = tokenize_dataset(review_rows(3), tok, max_length=32, max_prompt_length=16)
    items = mask_pairs(model, tok, masks, examples, sentiment=Sentiment(), batch_pairs=2)
    batch = PreferenceCollator(tok.pad_token_id)(examples)
    with torch.no_grad():
        _, _, det = compute_loss(model, batch, LossConfig(loss_type="sparsepo", masks=masks), return_details=True)
    shown = [t["reward_mask"] for p in items for t in p["chosen"]]
    want = det["reward_mask"][det["seq_ids"] < 3].tolist()
    assert shown == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert [t["text"] for t in items[0]["chosen"]][0] == " great"
    assert items[0]["chosen"][0]["sentiment"]  # "great" is in VADER's lexicon
    lift = mask_lift(items)
    assert lift["sentiment_tokens"] > 0 and lift["other_tokens"] > 0


def test_inspect_masks_page_renders(run_dir):
    (run_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in review_rows(5)))
    main(["inspect-masks", str(run_dir / "run"), "--data", str(run_dir / "pairs.jsonl"), "--pairs", "4"])
    page = run_dir / "run" / "masks.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained
    dom = render(page)
    assert "rendered 4 pairs" in dom and "reward mask" in dom


def test_mask_pages_in_one_folder_keep_their_own_lift_and_never_overwrite_the_data(run_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in review_rows(5)))
    run = str(run_dir / "run")
    for name, n in (("a.html", "4"), ("b.html", "2")):
        main(["inspect-masks", run, "--data", str(pairs), "--pairs", n, "--out", str(tmp_path / name)])
    assert {p.name for p in tmp_path.iterdir()} >= {"a.html", "a_lift.json", "b.html", "b_lift.json"}
    lifts = [json.loads((tmp_path / f"{k}_lift.json").read_text()) for k in "ab"]
    assert lifts[0]["sentiment_tokens"] > lifts[1]["sentiment_tokens"]  # 4 pairs against 2: not one file
    before = pairs.read_bytes()
    with pytest.raises(SystemExit, match=r"--out .*pairs.jsonl: must name an .html file"):
        main(["inspect-masks", run, "--data", str(pairs), "--out", str(pairs)])
    assert pairs.read_bytes() == before


def test_a_mask_the_run_turned_off_is_drawn_as_the_loss_used_it(run_dir, tmp_path):
    """A run with mask_on_reward false trained its reward net for nothing: the page shows the reward
    mask the loss used (1 everywhere), and there is no lift to report."""
    import shutil

    import yaml

    from sparsepo_lite.eval.views import write_mask_viewer

    run = tmp_path / "run"
    shutil.copytree(run_dir / "run", run)
    (run / "mask_lift.json").write_text("{}")  # an earlier page's, which must not pass for this one's
    config = yaml.safe_load((run / "sparsepo_config.yaml").read_text())
    (run / "sparsepo_config.yaml").write_text(yaml.safe_dump({**config, "mask_on_reward": False}))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in review_rows(3)))
    _, lift, shown = write_mask_viewer(str(run), str(pairs), pairs=3)
    assert shown == 3 and lift == {} and not (run / "mask_lift.json").exists()
    model, tok, masks, _ = load_run(str(run))
    examples, _ = tokenize_dataset(review_rows(3), tok, max_length=32, max_prompt_length=16)
    items = mask_pairs(model, tok, masks, examples, mask_on_reward=False)
    tokens = [t for p in items for side in ("chosen", "rejected") for t in p[side]]
    assert {t["reward_mask"] for t in tokens} == {1.0}
    assert len({t["kl_mask"] for t in tokens}) > 1  # the KL mask, which the loss used, is still drawn


def test_eval_sentiment_reads_implicit_prompts_as_training_does_and_names_rows_it_cannot_use(run_dir, tmp_path, caplog):
    import logging
    import shutil

    from sparsepo_lite.eval.sentiment import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(run_dir / "run", run)
    messages = [{"role": "user", "content": "Review:"}]
    rows = [
        {
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": "great"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
        {"chosen": "The film was great.", "rejected": "The film was bad."},  # implicit: "The film was"
        {"prompt": None, "chosen": "a", "rejected": "b"},  # malformed: training skips it too
        review_rows(1, offset=40)[0],
    ]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="sparsepo_lite.eval.sentiment"):
        evaluate_run(str(run), str(data), prompts=2, samples=1, max_new_tokens=2)
    assert "rows [0, 2] have no text prompt" in caplog.text
    saved = json.loads((run / "sentiment_eval.json").read_text())
    assert [s["prompt"] for s in saved["samples"]] == ["The film was", rows[3]["prompt"]]
    # a continuation past the model's context (2048 positions) would fail midway or run on for minutes
    with pytest.raises(ValueError, match=r"--max-new-tokens 5000 after the longest prompt \(\d+ tokens\) runs past"):
        evaluate_run(str(run), str(data), prompts=2, samples=1, max_new_tokens=5000)


def test_sentiment_report_renders(run_dir):
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in review_rows(3, offset=40)))
    main(
        [
            "eval-sentiment",
            str(run_dir / "run"),
            "--data",
            str(run_dir / "eval.jsonl"),
            "--prompts",
            "3",
            "--samples",
            "1",
            "--max-new-tokens",
            "4",
        ]
    )
    result = json.loads((run_dir / "run" / "sentiment_eval.json").read_text())
    assert set(result["summary"]) == {
        "reward_policy",
        "reward_reference",
        "win_rate",
        "kl",
        "reward_gain",
        "reward_gain_se",
        "reward_policy_se",
        "reward_reference_se",
        "kl_se",
    }
    assert result["summary"]["kl_se"] >= 0  # 3 prompts: the spread of their mean KLs
    assert len(result["samples"]) == 3
    dom = render(run_dir / "run" / "sentiment_report.html")
    assert "rendered 3 samples" in dom
    assert 'id="verdict"' in dom and "The policy's VADER reward is" in dom and 'id="reward-chart"' in dom
    assert "win rate of the policy" in dom and "reward_gain_se" not in dom  # readable names, not keys


@pytest.mark.parametrize(
    "gain, se, says", [(0.2, 0.05, "higher than"), (-0.2, 0.05, "lower than"), (0.05, 0.05, "not distinguishable")]
)
def test_the_report_verdict_follows_the_gain_and_its_error(gain, se, says):
    summary = {"reward_gain": gain, "reward_gain_se": se, "win_rate": 0.5, "kl": 1.25}
    verdict = sentiment_verdict(summary)
    assert says in verdict and f"{gain:+.3f}" in verdict and "1.25 nats" in verdict


def _tok(text, u, sentiment=False, d=None, kl=0.1):
    return {"text": text, "reward_mask": u, "kl_mask": u if d is None else d, "kl": kl, "sentiment": sentiment}


def test_mask_lift_splits_sides_and_has_a_bootstrap_interval():
    pairs = [
        {
            "prompt": "p",
            "chosen": [_tok(" great", 2.0, True), _tok(" the", 1.0)],
            "rejected": [_tok(" awful", 0.5, True), _tok(" a", 1.0)],
        }
        for _ in range(10)
    ]
    pairs[3]["chosen"][0]["reward_mask"] = 3.0  # some spread between pairs, for the interval
    lift = mask_lift(pairs, resamples=500)
    on = (2.0 * 9 + 3.0 + 0.5 * 10) / 20
    assert lift["lift"] == pytest.approx(on / 1.0)
    assert lift["chosen"]["lift"] == pytest.approx((2.0 * 9 + 3.0) / 10)
    assert lift["rejected"]["lift"] == pytest.approx(0.5)
    lo, hi = lift["ci95"]
    assert lo <= lift["lift"] <= hi and lo < hi
    assert lift["rejected"]["ci95"] == [pytest.approx(0.5), pytest.approx(0.5)]  # no spread, no width
    assert lift["sentiment_tokens"] == 20 and lift["other_tokens"] == 20 and lift["pairs"] == 10
    assert mask_lift(pairs, resamples=500) == lift  # seeded: the same interval every time


def test_the_sentiment_word_rule_skips_one_letter_entries_and_symbols():
    s = Sentiment()
    assert "l" in s.analyzer.lexicon or "x" in s.analyzer.lexicon  # the entries the rule is about
    assert s.is_sentiment_word(" great") and s.is_sentiment_word(" Awful!") and s.is_sentiment_word("love,")
    for text in (" l", "x", " :)", " <3", " the", "", " 123"):
        assert not s.is_sentiment_word(text), text


def test_mask_viewer_scales_robustly_marks_words_and_hides_an_identical_kl_mask():
    from sparsepo_lite.eval.views import mask_viewer_html

    toks = [_tok(f" w{i}", 1.0 + 0.01 * i) for i in range(40)] + [_tok(" great", 500.0, True)]
    common = mask_viewer_html([{"prompt": "p", "chosen": toks, "rejected": toks[:5]}], {})
    assert "KL mask:" not in common and "common net" in common
    # the 500x outlier saturates; every ordinary token keeps a visible colour (95th percentile scale)
    assert "rgba(40,160,60,1.000)" in common and "rgba(40,160,60,0.000)" not in common
    assert "class='tok lex'" in common and "sentiment word" in common
    indep = [dict(t, kl_mask=t["reward_mask"] / 2) for t in toks]
    page = mask_viewer_html([{"prompt": "p", "chosen": indep, "rejected": indep[:5]}], {})
    assert "KL mask:" in page
