"""The page a team reads after a constitution change: a run against the run before it (`cai
compare`), or a change previewed on an earlier run's pairs (`cai impact`).

One self-contained HTML document in the style of the evaluation report (its stylesheet, tables and
inline PNG charts, `cai_lib.method.evaluation.report`): nothing loads from outside the file, and
all model and constitution text is HTML-escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from cai_lib.method.evaluation.comparison import (
    ConstitutionChange,
    ImpactReport,
    RunComparison,
    RunSide,
    label_lines,
)
from cai_lib.method.evaluation.head_to_head import HeadToHead
from cai_lib.method.evaluation.report import (
    CRITERION_TITLES,
    STYLE,
    _horizontal_bars,
    _num,
    _table,
    _text,
    _with_contents,
)
from cai_lib.method.label_shift import LabelShift

SECTION_TITLES = {"critique_revision": "critique/revision", "comparison": "comparison"}


def comparison_html(comparison: RunComparison) -> str:
    """The comparison of run B with run A as one HTML document."""
    c = comparison
    sections = [
        _summary(c.lines()[1:], c.notes, c.not_compared),
        _stages_section(c),
        _constitution_section(c.constitution),
        _settings_section(c.settings),
        _labels_section(c.labels, "B's labels against A's"),
        _pm_section(c),
        _policies_section(c.policies),
        _principle_effects_section(c),
    ]
    header = (
        "<h1>What changed: run B against run A</h1>"
        + _runs_table({"A": c.a, "B": c.b})
        + f'<p class="meta">Compared {escape(c.created_at)} · cai-platform {escape(c.code_version)}</p>'
    )
    return _document(f"CAI comparison: {c.b.run_id} vs {c.a.run_id}", header, sections)


def impact_html(report: ImpactReport) -> str:
    """The preview of a constitution change on an earlier run's pairs as one HTML document."""
    r = report
    summary = [r.constitution.line(), *(label_lines(r.labels) if r.labels else [])]
    sections = [
        _summary(summary, r.notes, []),
        _constitution_section(r.constitution),
        _labels_section(r.labels, f"labels under {r.constitution.after_ref} against the run's"),
    ]
    header = (
        f"<h1>Impact of {escape(r.constitution.after_ref)}: a preview, nothing trained</h1>"
        + _runs_table({"relabelled run": r.run})
        + f'<p class="meta">The pairs of run <code>{escape(r.run.run_id)}</code> relabelled under '
        f"<code>{escape(r.constitution.after_ref)}</code> by its feedback model <code>{escape(r.feedback_model)}"
        f"</code> with its label settings · {escape(r.created_at)} · cai-platform {escape(r.code_version)}</p>"
    )
    return _document(f"CAI impact: {r.constitution.after_ref}", header, sections)


def _document(title: str, header: str, sections: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n"
        f"</head>\n<body>\n<main>\n{header}\n{_with_contents(sections)}\n</main>\n</body>\n</html>\n"
    )


def _runs_table(runs: dict[str, RunSide]) -> str:
    rows = [
        [
            escape(name),
            f"<code>{escape(run.run_id)}</code>" + (f" {escape(run.run_name)}" if run.run_name else ""),
            f"<code>{escape(run.constitution_ref)}</code>",
            f"<code>{escape(run.base_model)}</code>",
            f"<code>{escape(run.feedback_model)}</code>",
            f"<code>{escape(run.judge_model)}</code>",
        ]
        for name, run in runs.items()
    ]
    return _table(["", "run", "constitution", "base model", "feedback model", "judge"], rows)


def _summary(lines: Sequence[str], notes: Sequence[str], not_compared: Sequence[str]) -> str:
    items = "".join(f"<li>{escape(line.strip())}</li>" for line in lines if not line.startswith(("note:", "not ")))
    warnings = "".join(f'<p class="warning">{escape(note)}</p>' for note in notes)
    missing = "".join(f"<li>{escape(line)}</li>" for line in not_compared)
    gaps = f"<h3>Not compared</h3><ul>{missing}</ul>" if missing else ""
    return f'<h2>Summary</h2>\n{warnings}<ul class="summary">{items}</ul>{gaps}'


def _stages_section(c: RunComparison) -> str:
    if not c.stages:
        return ""
    rows = [
        [
            f"<code>{escape(s.name)}</code>",
            escape(s.status),
            escape("; ".join(s.changed)) or '<span class="muted">–</span>',
            escape(", ".join(s.made_by)) or '<span class="muted">–</span>',
        ]
        for s in c.stages
    ]
    return (
        "<h2>Stages</h2>\n<p>Each stage's output is stored under a key of everything that made it. A stage B "
        "<b>reused</b> has A's output; one that <b>reran</b> has another key, and the column beside it says "
        "which part of the key differs from A's (settings, code, the constitution section it reads, or an "
        f"input made by an earlier stage).</p><p><code>{escape(c.stage_line())}</code></p>"
        + _table(["stage", "in B", "why", "B's output made by (when not B)"], rows)
    )


def _constitution_section(change: ConstitutionChange) -> str:
    if change.same:
        return f"<h2>Constitution</h2>\n<p>Both use <code>{escape(change.after_ref)}</code>.</p>"
    rows = [
        [
            f"<code>{escape(e.principle_id)}</code>",
            SECTION_TITLES[e.section],
            e.change,
            _text(e.before) if e.before else '<span class="muted">–</span>',
            _text(e.after) if e.after else '<span class="muted">–</span>',
        ]
        for e in change.edits
    ]
    few_shot = "<p>The few-shot examples changed too.</p>" if change.few_shot_changed else ""
    return (
        f"<h2>Constitution</h2>\n<p><code>{escape(change.before_ref)}</code> (sha256 "
        f"<code>{escape(change.before_sha256[:12])}</code>) → <code>{escape(change.after_ref)}</code> (sha256 "
        f"<code>{escape(change.after_sha256[:12])}</code>).</p>"
        + (_table(["principle", "section", "change", "before", "after"], rows) if rows else "")
        + few_shot
    )


def _settings_section(settings: Sequence[str]) -> str:
    if not settings:
        return ""
    items = "".join(f"<li><code>{escape(s)}</code></li>" for s in settings)
    return f"<h2>Settings</h2>\n<p>Run parameters that differ (A → B).</p><ul>{items}</ul>"


def _labels_section(labels: LabelShift | None, what: str) -> str:
    if labels is None:
        return ""
    overall = _table(
        ["pairs", "flipped", "flip rate [95% CI]", "mean shift", "mean |shift|"],
        [
            [
                _num(str(labels.n)),
                _num(str(labels.flips)),
                _num(f"{labels.flip_rate:.3f} [{labels.flip_ci_low:.3f}, {labels.flip_ci_high:.3f}]"),
                _num(f"{labels.mean_shift:+.4f}"),
                _num(f"{labels.mean_abs_shift:.4f}"),
            ]
        ],
    )
    principles = _table(
        ["principle", "change", "asked (A / B)", "on both", "flipped", "flip rate", "mean shift"],
        [
            [
                f"<code>{escape(p.principle_id)}</code>",
                escape(p.status),
                _num(f"{p.asked_a} / {p.asked_b}"),
                _num(str(p.n)),
                _num(str(p.flips)),
                _num("–" if p.flip_rate is None else f"{p.flip_rate:.3f}"),
                _num("–" if p.mean_shift is None else f"{p.mean_shift:+.4f}"),
            ]
            for p in labels.per_principle
        ],
    )
    scored = [p for p in labels.per_principle if p.flip_rate is not None]
    chart = (
        _horizontal_bars(
            [p.principle_id for p in scored],
            [p.flip_rate for p in scored],
            "share of pairs whose preferred answer flipped",
            "Flip rate per comparison principle",
        )
        if scored
        else ""
    )
    relabelled = (
        f" {labels.relabelled} of them were not labelled by the later labelling, which scored them for this page."
        if labels.relabelled
        else ""
    )
    cards = "".join(
        f'<div class="card"><div class="title">P(first answer better): {m.label_a:.3f} → {m.label_b:.3f} '
        f'({m.shift:+.3f}){" <b>flipped</b>" if m.flipped else ""} <span class="muted">principles '
        f"{escape(', '.join(m.principles_a))} → {escape(', '.join(m.principles_b))}</span></div>"
        f'<span class="label">Conversation</span>{_text(m.prompt)}'
        + _table(["first answer", "second answer"], [[_text(m.answer_a), _text(m.answer_b)]])
        + "</div>"
        for m in labels.most_moved
    )
    return (
        f"<h2>Labels</h2>\n<p>{escape(what)}, on the {labels.n} pairs both labelled (A labelled "
        f"{labels.labels_a}, B {labels.labels_b}).{escape(relabelled)} A label is the feedback model's P(first "
        "answer better); a pair <b>flips</b> when one labelling prefers the first answer and the other the "
        "second (a tie prefers neither); its <b>shift</b> is the later label minus the earlier. Per principle, "
        "the principle's own label over the pairs both labellings asked it on.</p>"
        f"{overall}<h3>Per comparison principle</h3>{principles}{chart}"
        f"<h3>The pairs that moved most</h3>{cards or '<p class=muted>No label moved.</p>'}"
    )


def _pm_section(c: RunComparison) -> str:
    if c.pm_accuracy is None:
        return ""
    rows = [
        [name, _num(str(acc.n)), _num(f"{acc.accuracy:.3f} [{acc.ci_low:.3f}, {acc.ci_high:.3f}]")]
        for name, acc in (("A", c.pm_accuracy.a), ("B", c.pm_accuracy.b))
    ]
    return (
        "<h2>Preference model</h2>\n<p>Each run's preference model on the same held-out human comparisons "
        f"(<code>{escape(c.pm_accuracy.a.source)}</code>): the share whose human choice it scores higher (a tie "
        "counts half), with 95% Wilson intervals.</p>"
        + _table(["run", "comparisons", "accuracy [95% CI]"], rows)
    )


def _policies_section(h2h: HeadToHead | None) -> str:
    if h2h is None:
        return ""
    rows = [
        [
            CRITERION_TITLES[r.criterion],
            f"<code>{escape(h2h.principles[r.criterion])}</code>",
            _num(str(r.n)),
            _num(f"{r.win_rate:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"),
            _num(f"{r.hard_win_rate:.3f} [{r.hard_ci_low:.3f}, {r.hard_ci_high:.3f}] of {r.decided}"),
        ]
        for r in h2h.win_rates
    ]
    cards = "".join(
        f'<div class="card"><div class="title">{CRITERION_TITLES[j.criterion].capitalize()}, principle '
        f"<code>{escape(j.principle_id)}</code>: P(B better) = {j.label:.3f}</div>"
        f'<span class="label">Prompt</span>{_text(j.prompt)}'
        + _table(["A's answer", "B's answer"], [[_text(j.answer_b), _text(j.answer_a)]])
        + "</div>"
        for j in h2h.most_different
    )
    return (
        f"<h2>Policies</h2>\n<p>B's {escape(h2h.policy)} policy against A's, judged by "
        f"<code>{escape(h2h.judge_ref)}</code> on the held-out prompts both runs answered: B's win rate, soft "
        "(mean P(B better)) and hard (share of decided comparisons B won), each with a 95% Wilson interval.</p>"
        + _table(["criterion", "principle", "prompts", "soft [95% CI]", "hard [95% CI] of decided"], rows)
        + f"<h3>Where the answers differ most</h3>{cards or '<p class=muted>The answers are the same text.</p>'}"
    )


def _principle_effects_section(c: RunComparison) -> str:
    if not c.principle_effects:
        return ""

    def cell(effect) -> str:
        if effect is None:
            return _num("–")
        delta = "–" if effect.mean_pm_delta is None else f"{effect.mean_pm_delta:+.3f}"
        return _num(f"{effect.draws} draws, {delta}")

    rows = [[f"<code>{escape(p.principle_id)}</code>", cell(p.a), cell(p.b)] for p in c.principle_effects]
    return (
        "<h2>Per critique/revision principle</h2>\n<p>How often each run's SL-CAI traces drew the principle, and "
        "the mean change in its own PM's score of the revisions it asked for (each run's PM scores its own "
        "traces).</p>" + _table(["principle", "A", "B"], rows)
    )
