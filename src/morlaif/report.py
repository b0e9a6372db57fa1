"""`morlaif report`: one self-contained report.html (figures embedded as PNG data URIs), and the
base-vs-aligned table `morlaif run` prints at the end.

Every number comes from the run's artifacts (eval/metrics.json, rl/log.jsonl, rm/metrics.json,
feedback/metrics.json, sft/metrics.json, eval/samples.jsonl; and, when they exist,
compare/compare.json, steer/*.json and human/*.json); sections whose artifact is missing say so
instead of showing anything made up. PNGs are also written to report/. The pages and figures of
`morlaif compare` and `morlaif steer` are drawn here too (`compare_page`, `steer_figure`).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml
from rich.table import Table

from morlaif.artifacts import atomic_write_text, read_jsonl
from morlaif.config import Config
from morlaif.lifecycle import run_stage

CSS = """
body{font:15px/1.5 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:28px 40px}header h1{margin:0 0 4px;font-size:26px}
header p{margin:0;color:#b8c0cf}main{max-width:1180px;margin:0 auto;padding:24px 40px 60px}
section{background:#fff;border-radius:10px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:20px 24px;margin:18px 0}
h2{font-size:19px;margin:0 0 12px}.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:12px}
.card{background:#f0f3f8;border-radius:8px;padding:12px 14px}.card .v{font-size:24px;font-weight:600}
.card .l{color:#5b6475;font-size:13px}.up{color:#137a3a}.down{color:#b3261e}
table{border-collapse:collapse;width:100%;font-size:14px}th,td{padding:6px 8px;border-bottom:1px solid #e4e7ec;text-align:left;vertical-align:top}
th{background:#f0f3f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:14px}img{max-width:100%}
img.wide{grid-column:1/-1;width:100%}
.note{color:#5b6475;font-size:13px}.resp{white-space:pre-wrap;max-width:460px}
.tag{display:inline-block;font-size:11px;padding:1px 6px;border-radius:8px;background:#e4e7ec;margin-left:4px}
.tag.ref{background:#fde2e1;color:#8c1d18}
"""


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display): loaded when a report is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, out_dir: Path, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    data = buf.getvalue()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.png").write_bytes(data)
    return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _fmt(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _delta_card(label, base, aligned, higher_is_better=True, nd=3, ref="base"):
    """A headline number and its change from `ref` (higher_is_better None: no direction is right)."""
    if base is None or aligned is None:
        return f'<div class="card"><div class="v">n/a</div><div class="l">{label}</div></div>'
    d = aligned - base
    cls = "" if abs(d) < 10 ** -nd or higher_is_better is None else "up" if (d > 0) == higher_is_better else "down"
    return (f'<div class="card"><div class="v">{aligned:.{nd}f} <span class="{cls}" style="font-size:15px">'
            f'({d:+.{nd}f})</span></div><div class="l">{label} — {ref} {base:.{nd}f}</div></div>')


def build(run_dir: Path, out_dir: Path) -> str:
    """report.html's text; its figures also go to out_dir/*.png."""
    ev = _load(run_dir / "eval" / "metrics.json")
    rm = _load(run_dir / "rm" / "metrics.json")
    fb = _load(run_dir / "feedback" / "metrics.json")
    sft = _load(run_dir / "sft" / "metrics.json")
    log = read_jsonl(run_dir / "rl" / "log.jsonl") if (run_dir / "rl" / "log.jsonl").is_file() else []
    held = read_jsonl(run_dir / "rl" / "heldout.jsonl") if (run_dir / "rl" / "heldout.jsonl").is_file() else []
    samples = read_jsonl(run_dir / "eval" / "samples.jsonl") if (run_dir / "eval" / "samples.jsonl").is_file() else []
    cfg_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    algo = scal = "?"
    if cfg_text:
        c = yaml.safe_load(cfg_text)
        algo, scal = c["rl"]["algo"], c["rl"]["scalarizer"]

    headline, objectives_fig = _what_changed(ev, fb, scal, out_dir)
    figs = [f for f in (_rl_curves(log, algo, out_dir), _heldout_curve(held, out_dir), objectives_fig) if f]
    parts = [
        headline,
        f'<section><h2>Training and per-objective rewards</h2><div class="figs">{"".join(figs)}</div></section>'
        if figs else "",
        _preference_models(rm, out_dir),
        _human_labels(run_dir),
        _comparison(run_dir, out_dir),
        _steering(run_dir),
        _feedback_and_sft(fb, sft),
        _samples(samples),
        f"<section><h2>Configuration</h2><pre class='note'>{html.escape(cfg_text)}</pre></section>" if cfg_text else "",
    ]
    title = f"morlaif report — {html.escape(run_dir.name)}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{title}</h1><p>Multi-objective RLAIF: {algo.upper()} with the {scal} scalarizer. "
            f"Every number below is read from this run's artifacts.</p></header><main>{''.join(parts)}</main></body></html>")


def _what_changed(ev, fb, scal: str, out_dir: Path) -> tuple[str, str]:
    """The headline cards (eval/metrics.json) and the per-objective bar chart."""
    if not ev:
        return ('<section><h2>What changed</h2><p class="note">No eval/metrics.json yet: run <code>morlaif eval</code>.'
                '</p></section>', "")
    rb, ra = ev["reward"]["base"], ev["reward"]["aligned"]
    rr, wr = ev["refusal_rate"], ev["win_rate"]
    cards = [
        _delta_card(f"scalarized reward ({ev.get('scalarizer', scal)})", rb["scalarized"], ra["scalarized"]),
        _delta_card("refusal on harmful prompts", rr["harmful"]["base"], rr["harmful"]["aligned"]),
        _delta_card("refusal on benign prompts (over-refusal)", rr["benign"]["base"], rr["benign"]["aligned"], False),
    ]
    if (rr.get("borderline") or {}).get("aligned") is not None:
        cards.append(_delta_card("refusal on borderline red-team prompts", rr["borderline"]["base"],
                                 rr["borderline"]["aligned"], None))
    if (rr["benign"].get("sft")) is not None:
        cards.append(_delta_card("over-refusal after RL", rr["benign"]["sft"], rr["benign"]["aligned"], False, ref="SFT"))
    if wr.get("aligned_vs_base") is not None:
        lo, hi = wr["ci95"]
        cards.append(f'<div class="card"><div class="v">{wr["aligned_vs_base"]:.2f}</div><div class="l">win rate aligned vs '
                     f'base (judge, n={wr["n"]}), 95% CI [{lo:.2f}, {hi:.2f}]</div></div>')
    vs = wr.get("aligned_vs_sft") or {}
    if vs.get("rate") is not None:
        lo, hi = vs["ci95"]
        cards.append(f'<div class="card"><div class="v">{vs["rate"]:.2f}</div><div class="l">win rate aligned vs '
                     f'SFT (judge, n={vs["n"]}), 95% CI [{lo:.2f}, {hi:.2f}]</div></div>')
    cards.append(f'<div class="card"><div class="v">{_fmt(ev["kl_to_base"], 2)}</div><div class="l">KL to base, nats per response</div></div>')
    section = (f'<section><h2>What changed</h2><div class="cards">{"".join(cards)}</div>'
               f'<p class="note">Held-out prompts: ' + ", ".join(f"{v} {k}" for k, v in ev["n_prompts"].items()) + '. '
               f'Rewards are {"z-scored per objective" if ev.get("normalized") else "raw"} preference-model scores. '
               f'Refusals: {html.escape(ev.get("refusal_detector", ""))}. '
               + _judge_note(fb, wr) + "</p></section>")
    objs = ev["objectives"]
    fig, ax = _pyplot().subplots(figsize=(max(5, 0.9 * len(objs) + 2), 3.4))
    x = range(len(objs))
    ax.bar([i - 0.2 for i in x], [rb["per_objective"][o] for o in objs], 0.4, label="base", color="#9aa5b8")
    ax.bar([i + 0.2 for i in x], [ra["per_objective"][o] for o in objs], 0.4, label="aligned", color="#2f6fde")
    ax.set_xticks(list(x), objs, rotation=30, ha="right")
    ax.axhline(0, color="#444", lw=0.6)
    ax.set_title("Reward per objective, before and after")
    ax.legend(frameon=False)
    return section, _png(fig, out_dir, "objectives")


def _rl_curves(log: list[dict], algo: str, out_dir: Path) -> str:
    """Scalarized and per-objective reward, and KL, per step of rl/log.jsonl."""
    if not log:
        return ""
    steps = [r["step"] for r in log]
    fig, axes = _pyplot().subplots(1, 2, figsize=(10, 3.4))
    axes[0].plot(steps, [r["scalarized_reward"] for r in log], color="#111", lw=2, label="scalarized")
    for o in (log[0].get("objective_rewards") or {}):
        axes[0].plot(steps, [r["objective_rewards"].get(o) for r in log], lw=1, alpha=0.8, label=o)
    axes[0].set_title(f"{algo.upper()} reward per step")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7, frameon=False, ncol=2)
    axes[1].plot(steps, [r.get("kl") if r.get("kl") is not None else float("nan") for r in log], color="#b3261e")
    axes[1].set_title("KL to reference per step")
    axes[1].set_xlabel("step")
    if any(r.get("rule_agreement") is not None for r in log):  # rl.refusal_reward: rollouts agreeing with the rule
        twin = axes[1].twinx()
        twin.plot(steps, [r["rule_agreement"] if r.get("rule_agreement") is not None else float("nan") for r in log],
                  color="#1a73e8", lw=1.5)
        twin.set_ylim(0, 1)
        twin.set_ylabel("rollouts refusing as the feedback model does", color="#1a73e8", fontsize=8)
    return _png(fig, out_dir, "rl_curves").replace("<img ", '<img class="wide" ')


def _preference_models(rm, out_dir: Path) -> str:
    """Held-out accuracy and regression weight per objective, and the correlation heatmap."""
    if not rm:
        return ""
    objs = list(rm["accuracy"])
    n_eval = rm.get("n_eval_decisive") or {}
    acc_c, n_c = rm.get("accuracy_consistent") or {}, rm.get("n_eval_consistent") or {}
    cal, longer = rm.get("calibration_agreement") or {}, rm.get("longer_wins") or {}
    rows = "".join(f"<tr><td>{html.escape(o)}</td><td class='num'>{_fmt(rm['accuracy'][o])}</td>"
                   f"<td class='num'>{n_eval.get(o, 'n/a')}</td>"
                   f"<td class='num'>{_fmt(acc_c.get(o))} (n={n_c.get(o, 'n/a')})</td>"
                   f"<td class='num'>{_fmt(longer.get(o))}</td>"
                   f"<td class='num'>{_fmt((cal.get(o) or {}).get('accuracy'))} (n={(cal.get(o) or {}).get('n', 0)})</td>"
                   f"<td class='num'>{_fmt((rm.get('regression_weights') or {}).get(o))}</td></tr>" for o in objs)
    corr = rm.get("correlation") or []
    heatmap = ""
    if corr:
        fig, ax = _pyplot().subplots(figsize=(4.6, 3.8))
        im = ax.imshow(corr, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(objs)), objs, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(objs)), objs, fontsize=8)
        for i in range(len(objs)):
            for j in range(len(objs)):
                ax.text(j, i, f"{corr[i][j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(corr[i][j]) > 0.6 else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title("Correlation of objective scores")
        heatmap = _png(fig, out_dir, "correlation")
    return (f'<section><h2>Preference models ({html.escape(str(rm.get("layout", "")))})</h2><div class="figs"><div>'
            f'<table><tr><th>objective</th><th>held-out accuracy</th><th>held-out pairs</th><th>on labels both judge orders '
            f'agree on</th><th>longer response wins (length alone)</th><th>on the calibration pairs</th><th>regression weight</th></tr>{rows}</table>'
            f'<p class="note">Single-objective baseline (holistic label): {_fmt(rm.get("single_objective_accuracy"))}. '
            f'Accuracy is agreement with the AI labels on held-out pairs, so it is bounded by the labels\' quality; a '
            f'label whose sign flips with the order it was asked in is no yardstick, hence the consistent-label column.</p>'
            f'</div>{heatmap}</div></section>')


def _feedback_and_sft(fb, sft) -> str:
    """Who wrote and judged the data, and how good the judge is: calibration, human labels, label strength."""
    rows = []
    if sft:
        w = sft.get("writers") or {}
        rows.append(("SL targets", f"{html.escape(str(sft.get('method')))}; answers by "
                                   f"{html.escape(str(w.get('initial')))}" + (f", critiques and revisions by "
                                   f"{html.escape(str(w['critique_revision']))}" if w.get("critique_revision") else "")))
        rows.append(("SFT rows (red-team / benign)", f"{sft.get('rows_revised')} / {sft.get('rows_benign')}"))
        rr = sft.get("refusal_rate") or {}
        if rr:
            rows.append(("targets that decline: red-team / benign prompts",
                         f"{_fmt(rr.get('target_harmful'), 2)} / {_fmt(rr.get('target_benign'), 2)}"))
        if sft.get("method") == "critique_revision":
            rows.append(("share of revisions differing from the initial answer", _fmt(sft.get("share_revised"))))
        if sft.get("dropped"):
            rows.append(("degenerate targets dropped", html.escape(json.dumps(sft["dropped"]))))
    if fb:
        cal = fb.get("calibration") or {}
        rows.append(("labelling", f"{html.escape(str(fb.get('strategy')))} by {html.escape(str(fb.get('judge_model')))}"
                                  f", {fb.get('labels')} labels on {fb.get('pairs')} pairs"))
        if fb.get("calibration_agreement") is not None:
            rows.append(("judge vs hand-labelled calibration set",
                         f"{_fmt(fb['calibration_agreement'])} (n={cal.get('n')}; always-longer "
                         f"{_fmt(cal.get('longer_response_baseline'), 2)}, always-shorter "
                         f"{_fmt(cal.get('shorter_response_baseline'), 2)}; position consistency "
                         f"{_fmt(cal.get('position_consistency'), 2)})"))
        for name, h in (fb.get("human") or {}).items():
            rows.append((f"judge vs human labels ({html.escape(name)})",
                         f"{_fmt(h['agreement'])} (n={h['n']}; always-shorter {_fmt(h['shorter_response_baseline'], 2)}, "
                         f"always-longer {_fmt(h['longer_response_baseline'], 2)})"))
        pc = [v for v in (fb.get("position_consistency") or {}).values() if v is not None]  # None: nothing judged
        if pc:
            rows.append(("position consistency of the labels (mean over objectives)", _fmt(sum(pc) / len(pc))))
        if fb.get("decisive_share") is not None:
            rows.append(("labels with |P(a) - 0.5| > 0.2", _fmt(fb["decisive_share"], 2)))
        if fb.get("mean_margin") is not None:
            rows.append(("mean |P(a) - 0.5| of the labels", _fmt(fb["mean_margin"], 3)))
        sampled = "base policy" if fb.get("pairs_kind") == "base_vs_target" else "policy"
        wins = fb.get("target_wins") or {}
        for kind, per in (fb.get("target_preferred") or {}).items():
            if per:
                rows.append((f"P(SL target preferred over the {sampled}'s sample), {kind} prompts (share of labels "
                             "preferring the target)",
                             ", ".join(f"{html.escape(o)} {_fmt(v, 2)} ({_fmt(wins.get(kind, {}).get(o), 2)})"
                                       for o, v in per.items())))
        for kind, rep in (fb.get("pairs_by_kind") or {}).items():  # the on-policy pairs: who refuses, who is judged
            refuse = ", ".join(f"{html.escape(src)} {_fmt(v, 2)}" for src, v in rep["refusal_by_source"].items())
            rows.append((f"{kind} prompts: refusal by side; pairs with one refusal; labels whose two orders agree",
                         f"{refuse}; {_fmt(rep['one_side_refuses'], 2)} of {rep['pairs']}; "
                         + ", ".join(f"{html.escape(o)} {_fmt(v, 2)}" for o, v in rep["consistent"].items())))
            if rep.get("decided_pairs"):
                rows.append((f"{kind} prompts: pairs labelled by the feedback model's own decision; share where it "
                             "refused (the refusal wins)",
                             f"{rep['decided_pairs']}; {_fmt(rep['decision_prefers_refusal'], 2)}"))
        for k in ("label_entropy", "labels_per_s"):
            if fb.get(k) is not None:
                rows.append((k.replace("_", " "), _fmt(fb[k], 2)))
        if fb.get("contrast"):
            rows.append(("contrast check", html.escape(json.dumps(fb["contrast"]))))
    if not rows:
        return ""
    body = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return f"<section><h2>The teacher: supervised data and AI feedback</h2><table>{body}</table></section>"


def _heldout_curve(held: list[dict], out_dir: Path) -> str:
    """rl/heldout.jsonl: the scalarized reward and refusal rates of greedy answers to fixed held-out prompts."""
    if len(held) < 2:
        return ""
    steps = [r["step"] for r in held]
    fig, axes = _pyplot().subplots(1, 2, figsize=(10, 3.2))
    axes[0].plot(steps, [r["scalarized_reward"] for r in held], marker="o", color="#111")
    axes[0].set_title(f"Scalarized reward on {held[0]['n']} held-out prompts (greedy)")
    axes[0].set_xlabel("step")
    for kind, color in (("harmful", "#2f6fde"), ("borderline", "#8a6d1f"), ("benign", "#b3261e")):
        if kind in held[0]["refusal_rate"]:
            axes[1].plot(steps, [r["refusal_rate"][kind] for r in held], marker="o", color=color, label=kind)
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_title("Refusal rate on the held-out prompts")
    axes[1].set_xlabel("step")
    axes[1].legend(frameon=False)
    return _png(fig, out_dir, "heldout").replace("<img ", '<img class="wide" ')


def _samples(samples: list[dict]) -> str:
    if not samples:
        return ""
    names = [n for n in ("base", "sft", "aligned") if n in samples[0]]

    def cell(text, refused):
        tag = '<span class="tag ref">refusal</span>' if refused else ""
        return f'<td class="resp">{html.escape(text)}{tag}</td>'

    body = "".join(
        f"<tr><td>{html.escape(s['prompt'])}<span class='tag'>{s['kind']}</span></td>"
        + "".join(cell(s[n], s.get(f"{n}_refusal")) for n in names)
        + f"<td class='num'>{' → '.join(_fmt(s.get(f'{n}_reward'), 2) for n in names)}</td></tr>"
        for s in samples[:24])
    head = "".join(f"<th>{n}</th>" for n in names)
    return (f"<section><h2>Samples, side by side</h2><table><tr><th>prompt</th>{head}"
            f"<th>scalarized reward</th></tr>{body}</table></section>")


def _judge_note(fb, wr) -> str:
    if not wr or wr.get("aligned_vs_base") is None:
        return ""
    cal = (fb or {}).get("calibration_agreement")
    if cal is None:
        return "Win rate by the feedback model; its accuracy is unmeasured here."
    trust = "near chance, so treat the win rate as noise" if cal < 0.6 else "above chance"
    human = "".join(f" On human labels ({name}) it agrees {h:.0%} of the time." for name, h in
                    ((fb or {}).get("human_agreement") or {}).items() if h is not None)
    return (f"Win rate by {html.escape(str((fb or {}).get('judge_model')))}, which agrees with the hand-labelled "
            f"calibration set {cal:.0%} of the time ({trust}).{human}")


def _human_labels(run_dir: Path) -> str:
    """`morlaif rm --human` results (RUN/human/*.json): agreement of the preference models with human labels."""
    results = [r for p in sorted((run_dir / "human").glob("*.json")) if (r := _load(p)) and "agreement" in r]
    if not results:
        return ""

    def cell(a):
        return "<td class='num'>n/a</td>" if not a or a["accuracy"] is None else (
            f"<td class='num'>{a['accuracy']:.3f} [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}]</td>")

    parts = []
    for r in results:
        ag = r["agreement"]
        rows = [(o, a) for o, a in ag["per_objective"].items()]
        rows += [("holistic (baseline model)", ag["holistic"]), (f"scalarized ({r['scalarizer']})", ag["scalarized"]),
                 ("longer response", ag["longer_response"]), ("shorter response", ag["shorter_response"])]
        body = "".join(f"<tr><td>{html.escape(k)}</td>{cell(a)}</tr>" for k, a in rows)
        f = r["fitted"]
        coef = ", ".join(f"{html.escape(o)} {w:+.3f}" for o, w in f["coefficients"].items())
        cv = _fmt(f.get("accuracy_cv5"))
        parts.append(f"<h3>{html.escape(r['file'])} ({r['n']} pairs)</h3><table><tr><th>scored by</th>"
                     f"<th>agreement with the human labels [95% interval]</th></tr>{body}</table>"
                     f"<p class='note'>Linear weights fitted to the human labels: {coef} (agreement "
                     f"{_fmt(f['accuracy_in_sample'])} in sample, {cv} held out). "
                     + (f"<code>{html.escape(r['set_weights'])}</code>" if r.get("set_weights") else "") + "</p>")
    return (f"<section><h2>Preference models against human labels</h2>{''.join(parts)}"
            f"<p class='note'>Chance is 0.5. From <code>morlaif rm --human SET</code>.</p></section>")


def compare_table(res: dict) -> str:
    """The arms of compare.json as an HTML table, the base first."""
    def ci(w):
        return "n/a" if not w else f"{w['rate']:.2f} [{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}]"

    b = res["base"]
    rows = [f"<tr><td>base</td><td></td><td class='num'>{b['scalarized']:.3f}</td>"
            f"<td class='num'>{b['refusal']['harmful']:.3f}</td><td class='num'>{b['refusal']['benign']:.3f}</td>"
            f"<td></td><td class='num'>{b['mean_response_tokens']:.1f}</td><td></td><td></td><td></td></tr>"]
    for arm, a in res["arms"].items():
        train = "n/a" if a["train_s"] is None else f"{a['train_s']:.0f}" + (" (the run's rl)" if a["reused_run_rl"] else "")
        rows.append(f"<tr><td>{html.escape(arm)}</td><td>{html.escape(a['trained_with'])}</td>"
                    f"<td class='num'>{a['scalarized']:.3f}</td><td class='num'>{a['refusal']['harmful']:.3f}</td>"
                    f"<td class='num'>{a['refusal']['benign']:.3f}</td><td class='num'>{_fmt(a['kl_to_base'])}</td>"
                    f"<td class='num'>{a['mean_response_tokens']:.1f}</td><td class='num'>{ci(a['win_rate_vs_base'])}</td>"
                    f"<td class='num'>{ci(a['win_rate_vs_baseline'])}</td><td class='num'>{train}</td></tr>")
    y = res["yardstick"]
    return (f"<table><tr><th>arm</th><th>trained on</th><th>scalarized reward ({html.escape(y['scalarizer'])})</th>"
            f"<th>refusal, harmful</th><th>refusal, benign</th><th>KL to base</th><th>response tokens</th>"
            f"<th>win rate vs base [95%]</th><th>win rate vs {html.escape(str(res.get('baseline_arm') or 'baseline'))} "
            f"[95%]</th><th>train s</th></tr>{''.join(rows)}</table>")


def compare_figure(res: dict, out_dir: Path) -> str:
    """Per-objective x arm heatmap of the yardstick rewards (the base first, the scalarized reward last)."""
    objs = res["yardstick"]["objectives"]
    names = ["base", *res["arms"]]
    rows = [res["base"], *res["arms"].values()]
    grid = [[r["per_objective"][o] for o in objs] + [r["scalarized"]] for r in rows]  # (arms + 1, K + 1)
    cols = [*objs, "scalarized"]
    fig, ax = _pyplot().subplots(figsize=(max(5.0, 0.9 * len(cols) + 2.5), 0.45 * len(names) + 1.6))
    lim = max(1e-6, max(abs(v) for row in grid for v in row))
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if abs(v) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"Held-out reward per objective and arm ({'z-scored' if res['yardstick']['normalized'] else 'raw'})")
    return _png(fig, out_dir, "compare_objectives")


def compare_page(res: dict, out_dir: Path) -> str:
    """compare.html's text: the table and the per-objective x arm figure (also written to out_dir)."""
    title = f"morlaif compare — {html.escape(Path(res['run']).name)}"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in res["notes"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{title}</h1><p>{len(res['arms'])} arms, {res['algo'].upper()} for {res['steps']} steps each, "
            f"seed {res['seed']}; {res['n_prompts']['harmful']} harmful and {res['n_prompts']['benign']} benign held-out "
            f"prompts.</p></header><main><section><h2>Arms</h2>{compare_table(res)}<ul class='note'>{notes}</ul>"
            f"</section><section><h2>Reward per objective</h2>{compare_figure(res, out_dir)}</section></main></body></html>")


def _comparison(run_dir: Path, out_dir: Path) -> str:
    """RUN/compare/compare.json, when `morlaif compare` wrote it: its table and figure, and a link to its page."""
    res = _load(run_dir / "compare" / "compare.json")
    if not res:
        return ""
    return (f"<section><h2>Scalarizers and the single-objective baseline compared</h2>{compare_table(res)}"
            f"<div class='figs'>{compare_figure(res, out_dir)}</div><p class='note'>Each arm trained from this run's "
            f"SFT policy and preference models, measured with this run's scalarizer. Page: "
            f"<a href='compare/compare.html'>compare/compare.html</a>.</p></section>")


def steer_figure(res: dict, path: Path) -> None:
    """The steering curve: objective X's reward and the run's scalarized reward of the best-of-N picks
    against X's weight (dashed: one sample, no reranking)."""
    w = [p["weight"] for p in res["points"]]
    fig, ax = _pyplot().subplots(figsize=(6, 3.6))
    ax.plot(w, [p["objective_reward"] for p in res["points"]], "o-", color="#2f6fde", label=f"{res['objective']} reward")
    ax.plot(w, [p["scalarized"] for p in res["points"]], "s-", color="#111", label=f"scalarized ({res['yardstick']['scalarizer']})")
    if res.get("one_sample"):  # best-of-N only: a conditioned policy's curve has no rerank to compare with
        ax.axhline(res["one_sample"]["objective_reward"], color="#2f6fde", ls="--", lw=0.8, label="one sample")
    ax.set_xlabel(f"weight of {res['objective']}")
    ax.set_ylabel("reward" + (" (z-scored)" if res["yardstick"]["normalized"] else ""))
    rho = res["spearman_weight_vs_objective_reward"]
    how = "Conditioned-policy" if res.get("mode") == "conditioned" else f"Best-of-{res['n']}"
    ax.set_title(f"{how} steering ({res['scalarizer']}), Spearman {'n/a' if rho is None else f'{rho:.2f}'}")
    ax.legend(frameon=False, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def _steering(run_dir: Path) -> str:
    """RUN/steer/*.json, when `morlaif steer` wrote them: each curve and its numbers."""
    parts = []
    for p in sorted((run_dir / "steer").glob("*.json")):
        res = _load(p)
        png = p.with_suffix(".png")
        if not res or "points" not in res or not png.is_file():
            continue
        g = res["gain_w1_minus_w0"]
        rho = res["spearman_weight_vs_objective_reward"]
        img = f'<img alt="steer {html.escape(res["objective"])}" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">'
        parts.append(f"<div>{img}<p class='note'>{html.escape(res['objective'])}: Spearman(weight, reward) "
                     f"{_fmt(rho, 2)}; reward at weight 1 minus at weight 0: {g['mean']:+.3f} "
                     f"[{_fmt(g['ci95'][0])}, {_fmt(g['ci95'][1])}] over {res['prompts']} prompts — "
                     f"{html.escape(res['verdict'])}.</p></div>")
    if not parts:
        return ""
    return (f"<section><h2>Steering without retraining (best-of-N)</h2><div class='figs'>{''.join(parts)}</div>"
            f"<p class='note'>From <code>morlaif steer</code>: the same samples reranked at each weight.</p></section>")


def write(run_dir: Path) -> int:
    """(Re)write RUN/report.html (figures to RUN/report/); returns its size. `morlaif compare` and `morlaif
    steer` call it so the report links what they wrote."""
    html_text = build(run_dir, run_dir / "report")
    atomic_write_text(run_dir / "report.html", html_text)
    return len(html_text)


def run(cfg: Config, run_dir: Path) -> Path:
    """Stage `report`: RUN/report.html and RUN/report/*.png."""
    # The stages' results it shows (compare, steer and rm --human rewrite the report themselves: not inputs).
    shown = ("sft/metrics.json", "feedback/metrics.json", "rm/metrics.json", "rl/log.jsonl", "rl/heldout.jsonl",
             "eval/metrics.json", "eval/samples.jsonl")
    inputs = [run_dir / f for f in shown if (run_dir / f).is_file()]

    def body(out: Path) -> dict:
        return {"bytes": write(run_dir)}

    return run_stage("report", run_dir / "report", config=cfg.sections("rl"), inputs=inputs, body=body, main_only=True)


def summary_table(run_dir: Path, times: dict[str, float], total: float) -> Table:
    """The base / SFT / aligned table printed after `morlaif run` (numbers read from eval/metrics.json)."""
    table = Table(title=f"morlaif run: {run_dir}  ({total / 60:.1f} min)")
    table.add_column("metric")
    m = _load(run_dir / "eval" / "metrics.json")
    names = (m or {}).get("policies") or ["base", "aligned"]
    for name in names:
        table.add_column(name, justify="right")
    if m:
        def row(label: str, values: dict, digits: int = 3) -> None:
            table.add_row(label, *[_fmt(values.get(n), digits) for n in names])

        row("scalarized reward", {n: m["reward"][n]["scalarized"] for n in names})
        for k in m["objectives"]:
            row(f"  {k}", {n: m["reward"][n]["per_objective"].get(k) for n in names})
        for kind, rates in m["refusal_rate"].items():
            n_kind = (m.get("n_prompts") or {}).get(kind)
            if n_kind != 0:
                row(f"refusal, {kind} prompts" + (f" ({n_kind})" if n_kind else ""), rates)
        wr = m.get("win_rate") or {}
        blank = [""] * (len(names) - 1)
        if wr.get("aligned_vs_base") is not None:
            lo, hi = wr["ci95"]
            table.add_row("win rate aligned vs base (judge)", *blank, f"{wr['aligned_vs_base']:.2f} [{lo:.2f}, {hi:.2f}]")
        vs = wr.get("aligned_vs_sft") or {}
        if vs.get("rate") is not None:
            lo, hi = vs["ci95"]
            table.add_row("win rate aligned vs SFT (judge)", *blank, f"{vs['rate']:.2f} [{lo:.2f}, {hi:.2f}]")
        row("KL to base (nats/response)", {"sft": m.get("kl_to_base_sft"), "aligned": m.get("kl_to_base")})
        row("mean response tokens", m["mean_response_tokens"], 1)
    for name, s in times.items():
        table.add_row(f"[dim]time {name}[/dim]", *[""] * (len(names) - 1), f"[dim]{s:.0f} s[/dim]")
    return table
