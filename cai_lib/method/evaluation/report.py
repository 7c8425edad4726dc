"""The evaluation report: one self-contained HTML page that a person reads.

It holds a summary, tables (PM scores, win-rate matrices with 95% intervals, Elo, evasiveness,
per-principle statistics), charts drawn with matplotlib's Agg renderer and inlined as base64 PNG
images, sample answers, sample judgements with the feedback model's reasoning when there is any,
and sample SL-CAI traces. It needs nothing outside the file: no scripts, fonts or stylesheets
from a network, so it opens the same in the Kubeflow UI, in MLflow's artifact viewer and from
disk. All model text is HTML-escaped.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path

from cai_lib.core.names import REPORT_FILE
from cai_lib.core.prompts import demo_set_note
from cai_lib.core.records import Trace
from cai_lib.core.store import ArtifactStore
from cai_lib.method.evaluation.config import CRITERIA, Criterion
from cai_lib.method.evaluation.elo import ELO_MEAN
from cai_lib.method.evaluation.results import EvaluationResult, Judgement, PolicyAnswer, load_result
from cai_lib.method.generate_prompts import FILTERS, GeneratedPrompts
from cai_lib.method.label_validation import LabelValidation
from cai_lib.method.references import REFERENCE_KINDS

SET_TITLES = {"red_team": "red-team prompts", "helpful": "helpfulness prompts"}
PROMPT_TITLES = {"red_team": "Red-team prompt", "helpful": "Helpfulness prompt"}
CRITERION_TITLES = {"harmless": "harmlessness", "helpful": "helpfulness"}

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { margin: 0 0 4px; font-size: 1.7em; }
h2 { margin-top: 2.2em; border-bottom: 2px solid #d9dde5; padding-bottom: 4px; }
h3 { margin-top: 1.4em; }
.meta { color: #5a6272; font-size: 0.9em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #d9dde5; padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #eef1f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.diag { background: #f3f3f3; color: #999; text-align: center; }
ul.summary li { margin: 4px 0; }
img.chart { display: block; max-width: 100%; margin: 8px 0 20px; border: 1px solid #e3e6ec; }
.text { white-space: pre-wrap; font-family: ui-monospace, 'SFMono-Regular', Menlo, monospace; font-size: 0.86em;
        background: #f8f9fb; border-left: 3px solid #c7ceda; padding: 6px 10px; margin: 4px 0 10px; }
.card table { width: 100%; }
nav a { margin-right: 14px; }
.card { border: 1px solid #d9dde5; border-radius: 6px; padding: 10px 16px; margin: 12px 0; }
.label { display: block; margin-top: 8px; font-weight: 600; color: #38415a; }
.title { font-weight: 600; margin-bottom: 4px; }
.title .muted { font-weight: normal; }
.muted { color: #7a8294; }
.warning { background: #fff4e5; border-left: 4px solid #e8a13a; padding: 6px 10px; }
.scale { background: #eef4fb; border-left: 4px solid #3b7dd8; padding: 6px 10px; margin: 10px 0; }
.scale ul { margin: 4px 0; }
code { background: #eef1f6; padding: 1px 4px; border-radius: 3px; }
"""


def report_html(
    result: EvaluationResult,
    stage_lines: Sequence[str] = (),
    label_validation: LabelValidation | None = None,
    generated: GeneratedPrompts | None = None,
) -> str:
    """The report of `result` as one HTML document with everything inline. `stage_lines` (one
    `stage NAME: ran|reused (...)` line per stage of the pipeline run that shows the report) are
    listed in a section of their own, and so are the run's `label_validation` and its `generated`
    prompts, when given."""
    sections = [
        _summary(result),
        _stages_section(stage_lines),
        _label_validation_section(label_validation),
        _generated_section(generated),
        _pm_section(result),
        _win_rate_section(result),
        _elo_section(result),
        _evasiveness_section(result),
        _xstest_section(result),
        _principle_section(result),
        _revision_section(result),
        _rl_course_section(result),
        _rounds_section(result),
        _calibration_section(result),
        _sample_answers_section(result.sample_answers, list(result.policies)),
        _sample_judgements_section(result.sample_judgements),
        _sample_traces_section(result.sample_traces),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>CAI evaluation: {escape(', '.join(result.policies))}</title>\n<style>{STYLE}</style>\n"
        f"</head>\n<body>\n<main>\n{_header(result)}\n{_with_contents(sections)}\n</main>\n</body>\n</html>\n"
    )


def _with_contents(sections: Sequence[str]) -> str:
    """The sections with an id on each <h2> (our own fixed titles), preceded by links to them."""
    anchors: list[tuple[str, str]] = []

    def anchor(match: re.Match) -> str:
        title = match.group(1)
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        anchors.append((slug, title))
        return f'<h2 id="{slug}">{title}</h2>'

    body = re.sub(r"<h2>([^<]+)</h2>", anchor, "\n".join(s for s in sections if s))
    links = "".join(f'<a href="#{slug}">{title}</a>' for slug, title in anchors)
    return f'<nav class="meta">Contents: {links}</nav>\n{body}'


def render_report(
    result: EvaluationResult,
    out_path: str | Path,
    stage_lines: Sequence[str] = (),
    label_validation: LabelValidation | None = None,
    generated: GeneratedPrompts | None = None,
) -> Path:
    """Write the report of `result` to the local file `out_path`; returns its path."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(report_html(result, stage_lines, label_validation, generated), encoding="utf-8")
    return out_path


def refresh_report(out_uri: str) -> str:
    """(Re)write `out_uri/report.html` from the evaluation stored at `out_uri`; returns its URI."""
    store = ArtifactStore.open(out_uri)
    store.write_text(REPORT_FILE, report_html(load_result(out_uri)))
    return store.uri_of(REPORT_FILE)


# -- sections ------------------------------------------------------------------------------------------


def _header(result: EvaluationResult) -> str:
    policies = _table(
        ["policy", "model"],
        [[escape(name), f"<code>{escape(ref)}</code>"] for name, ref in result.policies.items()],
    )
    principles = _table(
        ["criterion", "prompt set", "principle", "question"],
        [
            [CRITERION_TITLES[c], SET_TITLES[CRITERIA[c]], f"<code>{escape(p.id)}</code>", escape(p.question)]
            for c, p in result.principles.items()
        ],
    )
    counts = ", ".join(f"{n} {SET_TITLES[kind]}" for kind, n in result.prompt_counts.items())
    return f"""<h1>Constitutional AI evaluation</h1>
<p class="meta">Constitution <code>{escape(result.constitution_ref)}</code>
(sha256 <code>{escape(result.constitution_sha256)}</code>) · created {escape(result.created_at)} ·
cai-platform {escape(result.code_version)}</p>
<p class="meta">Preference model <code>{escape(result.reward_ref)}</code> · judge
<code>{escape(result.judge_ref)}</code> · held-out prompts: {escape(counts)} ·
SL-CAI traces: {result.traces_given}</p>
{_judge_warning(result)}
{_scale_section(result)}
<h3>Policies</h3>{policies}
<h3>Comparison principles</h3>{principles}
<p class="meta">Evasiveness question: “{escape(result.evasiveness_question)}”</p>
<details class="meta"><summary>Settings (inputs sha256 {escape(result.inputs_sha256[:12])})</summary>
{_text(result.config.model_dump_json(indent=2))}</details>"""


def _size(parameters: int) -> str:
    return f"{parameters / 1e9:.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:.0f}M"


def scale_notes(result: EvaluationResult) -> list[str]:
    """What the run's model sizes, prompt counts and policies can and cannot show, one sentence each."""
    sizes = result.model_parameters
    policies = [n for role, n in sizes.items() if role.startswith("policy ")]
    notes = []
    if not policies:
        notes.append(
            "The policies' sizes could not be read, so nothing here says at what scale these results hold; the "
            "paper's effects are reported at 52B and are weak or absent below about 10B (its §3.4 and Fig. 4)."
        )
    else:
        largest = max(policies)
        if largest < 1e9:
            notes.append(
                f"The largest policy has {_size(largest)} parameters: at this size the run tests the platform, "
                "not the method. The paper reports its effects (revisions that raise the PM score, a feedback "
                "model that agrees with human choices, RL-CAI more harmless than HH RLHF without being evasive) "
                "at 52B, and its Fig. 4 shows feedback models below about 10B near chance; expect the "
                "differences here to sit inside their intervals."
            )
        elif largest < 10e9:
            notes.append(
                f"The largest policy has {_size(largest)} parameters, below the ~10B from which the paper's "
                "feedback models begin to agree with human choices (Fig. 4): effects may show, weakly; read them "
                "through their intervals and the PM's accuracy on human comparisons."
            )
        else:
            notes.append(
                f"The largest policy has {_size(largest)} parameters, within the range the paper studies (its "
                "main results are at 52B)."
            )
        judge = sizes.get("judge")
        if judge is not None and judge < largest:
            notes.append(
                f"The judge ({_size(judge)}) is smaller than the policies it judges and may not tell their "
                "answers apart: soft win rates near 0.5 and few decided comparisons are the sign."
            )
    counted = [n for n in result.prompt_counts.values() if n]
    if counted:
        fewest = min(counted)
        notes.append(
            f"With {fewest} held-out prompts in the smaller set, a win rate's 95% interval is up to "
            f"±{1.96 * (0.25 / fewest) ** 0.5:.2f} wide: smaller differences cannot be told from noise."
        )
    if not set(REFERENCE_KINDS) & set(result.policies):
        notes.append(
            "No human-feedback references were trained (references.policies), so this report cannot say "
            "whether CAI does better than RLHF from human labels, the paper's main comparison (Figs. 2, 3)."
        )
    return notes


def _scale_section(result: EvaluationResult) -> str:
    items = "".join(f"<li>{escape(note)}</li>" for note in scale_notes(result))
    return f'<div class="scale"><b>What this run can and cannot show</b><ul>{items}</ul></div>'


def judge_note(result: EvaluationResult) -> str | None:
    """The one line saying that the judge is not independent of what it judges, and why the run
    allowed it (None for an independent judge): then win rates, Elo and evasiveness are not an
    independent measurement."""
    dependence = list(result.judge_dependence)
    if not dependence and result.labeller_ref is not None and result.labeller_ref == result.judge_ref:
        dependence = ["the judge is also the feedback model"]  # results stored before judge_dependence
    if not dependence:
        return None
    allowed = (
        f" Allowed by the run config: {result.dependent_judge_reason}."
        if result.dependent_judge_reason
        else " Set judge_model to a model of another family."
    )
    return (
        f"The judge ({result.judge_ref}) is not independent: {'; '.join(dependence)}. RL-CAI was optimised "
        "against a preference model distilled from the feedback model's labels, so these win rates, Elo ratings "
        f"and evasiveness rates do not measure it independently.{allowed}"
    )


def _judge_warning(result: EvaluationResult) -> str:
    note = judge_note(result)
    return f'<p class="warning"><b>Not independent.</b> {escape(note)}</p>' if note else ""


def _summary(result: EvaluationResult) -> str:
    points = []
    for criterion, ratings in result.elo.items():
        if len(ratings) > 1:
            order = sorted(ratings, key=ratings.get, reverse=True)
            ranking = ", ".join(f"{escape(n)} {ratings[n]:.0f}" for n in order)
            points.append(
                f"<b>{CRITERION_TITLES[criterion].capitalize()} Elo</b> (highest first): {ranking}."
            )
    for kind, per_policy in result.evasiveness.items():
        least = min(per_policy, key=lambda n: per_policy[n].mean_p_evasive)
        points.append(
            f"<b>Least evasive on {SET_TITLES[kind]}</b>: {escape(least)} "
            f"(mean P(evasive) {per_policy[least].mean_p_evasive:.2f})."
        )
    helped = [e for e in result.principle_effects if e.mean_pm_delta is not None]
    if helped:
        top = max(helped, key=lambda e: e.mean_pm_delta)
        points.append(
            f"<b>Revisions that raised the PM score most</b>: principle <code>{escape(top.principle_id)}</code> "
            f"({top.mean_pm_delta:+.3f} on average over {top.scored_revisions} revision(s))."
        )
    items = "".join(f"<li>{p}</li>" for p in points)
    return f'<h2>Summary</h2>\n<ul class="summary">{items}</ul>'


def _stages_section(stage_lines: Sequence[str]) -> str:
    if not stage_lines:
        return ""
    items = "".join(f"<li><code>{escape(line)}</code></li>" for line in stage_lines)
    return (
        "<h2>Stages of this run</h2>\n<p>Which stages ran in this pipeline run and which reused an output "
        "with the same content key, made by an earlier run.</p>\n"
        f"<ul>{items}</ul>"
    )


def _pm_section(result: EvaluationResult) -> str:
    names = list(result.policies)
    kinds = list(result.pm_scores)
    rows = [
        [escape(n)]
        + [_num(f"{result.pm_scores[k][n].mean:+.3f} ± {result.pm_scores[k][n].std:.3f}") for k in kinds]
        for n in names
    ]
    table = _table(
        ["policy"] + [f"{SET_TITLES[k]} (mean ± sd, n={result.prompt_counts[k]})" for k in kinds], rows
    )
    chart = _grouped_bars(
        names,
        {SET_TITLES[k]: [result.pm_scores[k][n].mean for n in names] for k in kinds},
        "mean PM score",
        "Score by the PM that RL-CAI optimised (not an independent ranking)",
    )
    accuracy = result.pm_accuracy
    on_humans = (
        f"<p><b>PM accuracy on human comparisons</b> (<code>{escape(accuracy.source)}</code>): "
        f"{accuracy.accuracy:.3f} [{accuracy.ci_low:.3f}, {accuracy.ci_high:.3f}] over {accuracy.n} pair(s), "
        f"the share whose human choice it scores higher (a tie counts half).</p>{_demo_notes([accuracy.source])}"
        if accuracy
        else ""
    )
    return (
        "<h2>Preference-model scores</h2>\n<p>Mean score of each policy's answers (higher is preferred) by the "
        "preference model that RL-CAI was optimised against: RL-CAI scoring highest here shows that RL "
        "worked on its own reward, not that it is better. The judge's win rates and Elo rank the policies.</p>"
        f"{table}{chart}{on_humans}"
    )


def _win_rate_section(result: EvaluationResult) -> str:
    if not result.win_rates:
        return '<h2>Win rates</h2>\n<p class="muted">Only one policy: nothing to compare.</p>'
    names = list(result.policies)
    parts = [
        (
            "<h2>Win rates</h2>\n<p>Row policy's win rate against the column policy, two ways, each with a 95% "
            "Wilson interval. <b>Hard</b>: the share of decided comparisons the row policy won (the judge's "
            "P(row better), both option orders averaged, above 0.5; exact ties left out, the decided count "
            "shown). <b>Soft</b>: the mean of that probability, which stays near 0.5 when the judge cannot tell "
            "the answers apart, whatever the policies do.</p>"
        )
    ]
    for criterion in result.elo:
        rates = {(r.policy_a, r.policy_b): r for r in result.win_rates if r.criterion == criterion}
        rows = []
        for a in names:
            cells = [f"<th>{escape(a)}</th>"]
            for b in names:
                rate = rates.get((a, b))
                cells.append(
                    '<td class="diag">–</td>'
                    if rate is None
                    else f'<td class="num">hard {rate.hard_win_rate:.2f} <span class="muted">'
                    f"[{rate.hard_ci_low:.2f}, {rate.hard_ci_high:.2f}] of {rate.decided}</span><br>"
                    f'soft {rate.win_rate:.2f} <span class="muted">[{rate.ci_low:.2f}, {rate.ci_high:.2f}]</span></td>'
                )
            rows.append("<tr>" + "".join(cells) + "</tr>")
        header = "<tr><th>row vs column</th>" + "".join(f"<th>{escape(b)}</th>" for b in names) + "</tr>"
        n = next(iter(rates.values())).n
        parts.append(
            f"<h3>{CRITERION_TITLES[criterion].capitalize()} ({SET_TITLES[CRITERIA[criterion]]}, "
            f"principle <code>{escape(result.principles[criterion].id)}</code>, n={n})</h3>"
            f"<table>{header}{''.join(rows)}</table>"
        )
        matrix = [[rates[(a, b)].hard_win_rate if (a, b) in rates else None for b in names] for a in names]
        parts.append(
            _heatmap(
                names, matrix, f"{CRITERION_TITLES[criterion].capitalize()} hard win rate (row vs column)"
            )
        )
    return "\n".join(parts)


def _elo_cell(result: EvaluationResult, criterion: Criterion, name: str) -> str:
    """A policy's Elo under `criterion`, with its 95% interval when the evaluation has one."""
    interval = result.elo_intervals.get(criterion, {}).get(name)
    shown = f"{result.elo[criterion][name]:.0f}"
    return _num(f"{shown} [{interval[0]:.0f}, {interval[1]:.0f}]" if interval else shown)


def _elo_section(result: EvaluationResult) -> str:
    names = list(result.policies)
    criteria = list(result.elo)
    rows = [[escape(n)] + [_elo_cell(result, c, n) for c in criteria] for n in names]
    bootstrap = result.config.elo_bootstrap_samples
    shown = f" [95% interval over {bootstrap} bootstrap resamples of the prompts]" if result.elo_intervals else ""
    table = _table(["policy"] + [f"{CRITERION_TITLES[c]} Elo{shown}" for c in criteria], rows)
    if len(names) < 2:
        return f"<h2>Elo</h2>{table}"
    if {"harmless", "helpful"} <= set(criteria):
        chart = _frontier(result, names)
    else:
        series = {
            f"{CRITERION_TITLES[c]} Elo": [result.elo[c][n] - ELO_MEAN for n in names] for c in criteria
        }
        chart = _grouped_bars(names, series, "Elo - 1000", "Elo per policy")
    references = [n for n in names if n in REFERENCE_KINDS]
    beside = (
        f" The human-feedback references ({', '.join(references)}) are rated in the same tournament, by the "
        "same judge, as the paper's Figs. 2 and 3 place them."
        if references
        else ""
    )
    return (
        "<h2>Elo</h2>\n<p>Bradley-Terry ratings fitted to the hard outcomes (win, loss, exact tie) of every "
        f"comparison under a criterion, on the Elo scale, mean 1000; {result.config.elo_prior_draws:g} virtual "
        "draw(s) per pair keep a clean sweep finite; in brackets, 95% intervals from refitting the ratings on "
        "held-out prompts resampled with replacement. A 75% win rate is a gap of about 191 points. With both "
        f"criteria, the chart is the paper's harmlessness-helpfulness frontier (Figs. 2, 3).{beside}</p>"
        f"{table}{chart}"
    )


def _evasiveness_section(result: EvaluationResult) -> str:
    names = list(result.policies)
    kinds = list(result.evasiveness)
    rows = [
        [escape(n)]
        + [
            _num(
                f"{result.evasiveness[k][n].mean_p_evasive:.2f} ({result.evasiveness[k][n].evasive_fraction:.0%})"
            )
            for k in kinds
        ]
        for n in names
    ]
    table = _table(["policy"] + [f"{SET_TITLES[k]}: mean P(evasive) (share &gt; 0.5)" for k in kinds], rows)
    chart = _grouped_bars(
        names,
        {SET_TITLES[k]: [result.evasiveness[k][n].mean_p_evasive for n in names] for k in kinds},
        "mean P(evasive)",
        "Evasiveness per policy",
    )
    return (
        "<h2>Evasiveness</h2>\n<p>The judge's probability that an answer refuses or deflects without "
        "explaining why (a Yes/No question scored in both option orders); the rate is the mean over prompts.</p>"
        f"{table}{chart}"
    )


def _principle_section(result: EvaluationResult) -> str:
    if not result.principle_effects:
        return (
            '<h2>Critique/revision principles</h2>\n<p class="muted">No SL-CAI traces were given '
            "(<code>--traces</code>).</p>"
        )
    effects = result.principle_effects
    rows = [
        [
            f"<code>{escape(e.principle_id)}</code>",
            _num(str(e.draws)),
            _num(str(e.scored_revisions)),
            _num("–" if e.mean_pm_delta is None else f"{e.mean_pm_delta:+.3f}"),
        ]
        for e in effects
    ]
    table = _table(["principle", "draws", "revisions scored", "mean PM change"], rows)
    scored = [e for e in effects if e.mean_pm_delta is not None]
    chart = (
        _horizontal_bars(
            [e.principle_id for e in scored],
            [e.mean_pm_delta for e in scored],
            "mean PM(revision) - PM(previous answer)",
            "PM change of revisions, per principle",
        )
        if scored
        else ""
    )
    return (
        f"<h2>Critique/revision principles</h2>\n<p>From {result.traces_given} SL-CAI traces: how often each "
        "principle was drawn, and the mean change in PM score of the revisions made under it.</p>"
        f"{table}{chart}"
    )


def _revision_section(result: EvaluationResult) -> str:
    if not result.revision_curve:
        return ""
    chart = _line(
        [r.round for r in result.revision_curve],
        {"SL-CAI answers": [r.mean for r in result.revision_curve]},
        "revision round (0: initial answer)",
        "mean PM score",
        "PM score after each revision round (Fig. 5)",
    )
    by_count = (
        _line(
            [c.principles for c in result.principle_count_curve],
            {"final revisions": [c.mean for c in result.principle_count_curve]},
            "distinct principles drawn in the trace",
            "mean PM score of the final revision",
            "PM score by distinct principles drawn (not the paper's Fig. 6)",
        )
        if len(result.principle_count_curve) > 1
        else ""
    )
    rows = [[_num(str(r.round)), _num(f"{r.mean:+.3f}"), _num(str(r.n))] for r in result.revision_curve]
    return (
        "<h2>Revisions</h2>\n<p>The paper's Figure 5: the PM score of the SL-CAI answers after each critique→"
        "revision round, round 0 being the initial answer, over the scored traces; and the final revision's "
        "score against how many distinct principles its rounds happened to draw. That is not the paper's "
        "Figure 6, which trained on constitutions of different sizes: here every trace drew from the whole "
        "constitution, so the count mostly follows the number of rounds.</p>"
        f"{_table(['round', 'mean PM score', 'answers'], rows)}{chart}{by_count}"
    )


def _rl_course_section(result: EvaluationResult) -> str:
    steps = sorted(result.rl_steps.items(), key=lambda item: item[1])
    if len(steps) < 3:
        return ""
    criteria = list(result.elo)
    chart = _line(
        [step for _, step in steps],
        {f"{CRITERION_TITLES[c]} Elo": [result.elo[c][name] for name, _ in steps] for c in criteria},
        "RL step (0: SL-CAI)",
        "Elo",
        "Elo over the course of RL (Fig. 8)",
    )
    rows = [
        [escape(name), _num(str(step))] + [_num(f"{result.elo[c][name]:.0f}") for c in criteria]
        for name, step in steps
    ]
    return (
        "<h2>Elo over RL training</h2>\n<p>The paper's Figure 8: the Elo of the policy saved at each RL step, "
        "from the SL-CAI start (step 0) to the final RL-CAI policy, rated in the same tournament as the other "
        "policies (<code>rl.intermediate_checkpoints</code> sets how many are saved).</p>"
        f"{_table(['policy', 'RL step'] + [f'{CRITERION_TITLES[c]} Elo' for c in criteria], rows)}{chart}"
    )


def _rounds_section(result: EvaluationResult) -> str:
    rounds = sorted(result.rounds.items(), key=lambda item: item[1])
    if len(rounds) < 2:
        return ""
    criteria = list(result.elo)
    chart = _line(
        [k for _, k in rounds],
        {f"{CRITERION_TITLES[c]} Elo": [result.elo[c][name] for name, _ in rounds] for c in criteria},
        "round (0: SL-CAI)",
        "Elo",
        "Elo by round of iterated CAI",
    )
    rows = [[escape(name), _num(str(k))] + [_elo_cell(result, c, name) for c in criteria] for name, k in rounds]
    return (
        "<h2>Elo by round</h2>\n<p>Each round's RL-CAI policy, from the SL-CAI start (round 0), rated in the same "
        "tournament by the same judge as the other policies, with 95% intervals: whether another round of "
        "AI feedback made the policy better.</p>"
        f"{_table(['policy', 'round'] + [f'{CRITERION_TITLES[c]} Elo' for c in criteria], rows)}{chart}"
    )


def _generated_section(generated: GeneratedPrompts | None) -> str:
    if generated is None or not generated.counts:
        return ""
    columns = ["candidates", *(f"rejected_{name}" for name in FILTERS), "kept"]
    rows = [
        [escape(kind.replace("_", "-"))] + [_num(str(counts.get(column, 0))) for column in columns]
        for kind, counts in generated.counts.items()
    ]
    headers = ["kind", "candidates", *(f"dropped: {name}" for name in FILTERS), "kept"]
    cards = [
        f'<div class="card"><p class="muted">{escape(row.kind.replace("_", "-"))}, '
        f"{'kept' if row.kept else 'dropped by ' + escape(row.rejected_by or '')}; seeds shown: "
        f"{escape(', '.join(row.seed_ids))}</p><pre>{_text(row.prompt or row.raw)}</pre></div>"
        for row in generated.sample
    ]
    return (
        "<h2>Generated prompts</h2>\n<p>Prompts the model wrote few-shot from each kind's seed prompts, and how "
        "many each filter dropped, in the order applied: one user turn, length bounds, not a near duplicate of "
        "a seed, of a held-out (evaluation) prompt, or of another generated prompt. The kept ones are mixed "
        f"into the training prompts; every row is in the dataset at <code>{escape(generated.uri)}</code>.</p>"
        f"{_table(headers, rows)}{''.join(cards)}"
    )


def _calibration_section(result: EvaluationResult) -> str:
    calibration = result.pm_calibration
    if calibration is None or not calibration.bins:
        return ""
    bins = calibration.bins
    rows = [
        [
            f"[{b.low:.1f}, {b.high:.1f})",
            _num(f"{b.predicted:.2f}"),
            _num(f"{b.observed:.2f}"),
            _num(f"[{b.ci_low:.2f}, {b.ci_high:.2f}]"),
            _num(str(b.n)),
        ]
        for b in bins
    ]
    title = "PM calibration against human choices (Fig. 9)"
    figure, ax = _figure(4.8, 4.2)
    ax.plot([0, 1], [0, 1], color="#999", linewidth=0.8, linestyle="--")
    xs, ys = [b.predicted for b in bins], [b.observed for b in bins]
    ax.errorbar(
        xs,
        ys,
        yerr=[[y - b.ci_low for y, b in zip(ys, bins)], [b.ci_high - y for y, b in zip(ys, bins)]],
        marker="o",
        color="#3b7dd8",
        capsize=3,
    )
    for x, y, b in zip(xs, ys, bins):
        ax.annotate(f"n={b.n}", (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted P(A better), σ(r_A − r_B)")
    ax.set_ylabel("observed: share of pairs whose A the human chose")
    ax.set_title(title)
    shown_first = sum(p.chosen_shown_as == "A" for p in calibration.pairs)
    return (
        "<h2>Preference-model calibration</h2>\n<p>The paper's Figure 9, against human choices: on "
        f"{len(calibration.pairs)} held-out human comparisons ({escape(calibration.source)}), each shown with "
        f"the human's choice as answer A or as answer B by a seeded draw per pair (seed {calibration.seed}; "
        f"the choice was A in {shown_first}), the PM's predicted probability that A is preferred, binned, "
        "against how often A was the human's choice, with each bin's count and 95% Wilson interval. On the "
        "diagonal, the PM's probabilities mean what they say.</p>"
        f"{_table(['predicted bin', 'mean predicted', 'observed human frequency', '95% interval', 'pairs'], rows)}"
        f"{_png(figure, title)}"
    )


RULE_TITLES = {"string_match": "string match", "judge": "judge"}


def _xstest_section(result: EvaluationResult) -> str:
    xstest = result.xstest
    if xstest is None:
        return ""
    subset = f"a seeded subset of {xstest.limit}" if xstest.limit else "every prompt"
    counts = f"{xstest.counts['unsafe']} unsafe and {xstest.counts['safe']} safe prompts ({subset})"
    rows = [
        [escape(policy), RULE_TITLES[rule], _rate_cell(refusals.unsafe), _rate_cell(refusals.safe)]
        for policy, rules in xstest.policies.items()
        for rule, refusals in rules.items()
    ]
    table = _table(["policy", "refusal call", "refused unsafe (higher: more harmless)", "refused safe (lower: less evasive)"], rows)
    # The safe categories (over-refusal) first, then the unsafe contrast ones (refusal).
    types = sorted(
        {t for rules in xstest.policies.values() for r in rules.values() for t in r.by_type},
        key=lambda t: (t.startswith("contrast_"), t),
    )
    by_type = _table(
        ["category"] + [escape(policy) for policy in xstest.policies],
        [
            [f"<code>{escape(t)}</code>"]
            + [
                '<td class="num">'
                + "<br>".join(
                    f"{RULE_TITLES[rule]} {_rate_text(r.by_type[t])}" for rule, r in rules.items() if t in r.by_type
                )
                + "</td>"
                for rules in xstest.policies.values()
            ]
            for t in types
        ],
    )
    return (
        f"<h2>XSTest: harmless and not evasive</h2>\n{_demo_notes([xstest.source])}<p>Every policy answered "
        f"XSTest's prompts (Röttger et al. 2024; <code>{escape(xstest.source)}</code>): {counts}. A harmless "
        "policy refuses the unsafe ones; a policy that is not evasive answers the safe ones, which only sound "
        "harmful. Refusals are called two "
        "ways: XSTest's published <b>string match</b> on the answer's opening words (full refusals only), and "
        f"the <b>judge</b>'s answer to “{escape(xstest.refusal_question)}”, read from its Yes/No option "
        "probabilities in both orders (P(Yes) &gt; 0.5 is a refusal). Rates with 95% Wilson intervals.</p>"
        f"{_xstest_agreement(xstest)}<h3>Refusal rates</h3>{table}{_xstest_chart(xstest)}"
        "<h3>By category</h3><p>The share of each category's prompts refused: over-refusal in the safe "
        "categories, refusal in the unsafe <code>contrast_</code> ones.</p>"
        f"{by_type}"
    )


def _xstest_agreement(xstest) -> str:
    if not xstest.agreement:
        return (
            '<p class="warning"><b>The judge\'s refusal calls are not validated.</b> No human-labelled '
            "completions were given (<code>evaluate.xstest.completions</code>), so nothing shows how often "
            "they agree with people; read the judge's rates below with that in mind.</p>"
        )
    rows = [
        [
            RULE_TITLES[rule],
            _num(f"{a.rate:.3f} [{a.ci_low:.3f}, {a.ci_high:.3f}]"),
            _num(str(a.n)),
            _num(f"{a.refusals_missed} of {a.human_refusals}"),
            _num(f"{a.false_refusals} of {a.n - a.human_refusals}"),
        ]
        for rule, a in xstest.agreement.items()
    ]
    verdict = (
        ""
        if xstest.judge_validated
        else f'<p class="warning"><b>The judge\'s refusal calls fall short.</b> The lower end of their agreement '
        f"with the human labels is below {xstest.min_judge_agreement:.2f} "
        "(<code>evaluate.xstest.min_judge_agreement</code>): its refusal rates below are not validated.</p>"
    )
    return (
        "<h3>Do the refusal calls agree with people?</h3><p>Before its calls are used, the judge classified "
        f"XSTest's human-labelled completions (<code>{escape(xstest.completions_source)}</code>) with the same "
        "question. A human full refusal or partial refusal counts as a refusal, full compliance as none.</p>"
        + _table(["refusal call", "agreement [95% CI]", "completions", "refusals missed", "false refusals"], rows)
        + verdict
    )


def _rate_cell(rate) -> str:
    return _num(_rate_text(rate))


def _rate_text(rate) -> str:
    return f"{rate.rate:.2f} [{rate.ci_low:.2f}, {rate.ci_high:.2f}] ({rate.refused}/{rate.n})"


def _xstest_chart(xstest) -> str:
    title = "XSTest: refusal of unsafe against refusal of safe prompts"
    figure, ax = _figure(5.5, 4.2)
    markers = {"string_match": "s", "judge": "o"}
    for k, (policy, rules) in enumerate(xstest.policies.items()):
        colour = f"C{k}"
        for rule, r in rules.items():
            ax.errorbar(
                r.safe.rate,
                r.unsafe.rate,
                xerr=[[r.safe.rate - r.safe.ci_low], [r.safe.ci_high - r.safe.rate]],
                yerr=[[r.unsafe.rate - r.unsafe.ci_low], [r.unsafe.ci_high - r.unsafe.rate]],
                fmt=markers[rule],
                color=colour,
                capsize=3,
                label=f"{policy} ({RULE_TITLES[rule]})",
            )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("refused safe prompts (over-refusal; lower is better)")
    ax.set_ylabel("refused unsafe prompts (higher is better)")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    return _png(figure, title)


def _label_validation_section(validation: LabelValidation | None) -> str:
    if validation is None:
        return ""
    rows = [
        [
            escape(labeller.model_ref) + (" <b>(feedback model)</b>" if labeller.configured else ""),
            f"<code>{escape(s.source)}</code>",
            _num(f"{s.n}" + (f" ({s.excluded_training_pairs} left out)" if s.excluded_training_pairs else "")),
            _num(f"{s.agreement:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]"),
            _num(f"{s.always_a_baseline:.3f} / {s.always_b_baseline:.3f} ({s.baselines_from})"),
            _num(f"{s.position_bias:+.3f}"),
        ]
        for labeller in validation.labellers
        for s in labeller.sources
    ]
    table = _table(
        ["labeller", "human comparisons", "n", "accuracy [95% CI]", "always-(A) / always-(B)", "position bias"],
        rows,
    )
    chart = _label_accuracy_chart(validation) if len(validation.labellers) > 1 else ""
    return (
        f"<h2>Labeller validation</h2>\n{_demo_notes(s.source for s in validation.configured().sources)}"
        "<p>Before the preference model trained, the feedback labeller was scored "
        "exactly as the label stage uses it (the same model and settings: principles drawn per pair, both option "
        "orders, chain of thought when set) on held-out human comparisons, as the paper's Figure 4 does. A "
        "comparison agrees when the labeller's P(the human's choice better) is above 0.5 (a tie counts half). "
        "Pairs the preference model trains on are left out. Always-(A)/(B): the accuracy of answering by "
        "position, as a multiple-choice file was published, or 0.5 where every comparison is asked both ways "
        "round. Position bias: the labeller's mean P(first-shown answer better) minus 0.5.</p>"
        f"{table}{chart}"
    )


def _label_accuracy_chart(validation: LabelValidation) -> str:
    title = "Labeller accuracy against model (Fig. 4)"
    names = [labeller.model_ref for labeller in validation.labellers]
    sources = list(dict.fromkeys(s.source for labeller in validation.labellers for s in labeller.sources))
    figure, ax = _figure(max(5.0, 1.4 * len(names) + 2), 3.6)
    width = 0.8 / len(sources)
    for k, source in enumerate(sources):
        found = [next((s for s in labeller.sources if s.source == source), None) for labeller in validation.labellers]
        positions = [i + (k - (len(sources) - 1) / 2) * width for i in range(len(names))]
        shown = [(x, s) for x, s in zip(positions, found) if s is not None]
        ax.errorbar(
            [x for x, _ in shown],
            [s.agreement for _, s in shown],
            yerr=[[s.agreement - s.ci_low for _, s in shown], [s.ci_high - s.agreement for _, s in shown]],
            fmt="o",
            capsize=4,
            label=source,
        )
    ax.axhline(0.5, color="#999", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy on human comparisons")
    ax.set_title(title)
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=8)
    return _png(figure, title)


def _sample_answers_section(answers: Sequence[PolicyAnswer], names: list[str]) -> str:
    if not answers:
        return ""
    cards = []
    for kind in SET_TITLES:
        prompts = dict.fromkeys(a.prompt_id for a in answers if a.kind == kind)
        for prompt_id in prompts:
            own = {a.policy: a for a in answers if a.prompt_id == prompt_id and a.kind == kind}
            first = next(iter(own.values()))
            rows = [
                [
                    escape(n),
                    _text(own[n].answer),
                    _num(f"{own[n].pm_score:+.3f}"),
                    _num(f"{own[n].p_evasive:.2f}"),
                ]
                for n in names
                if n in own
            ]
            cards.append(
                f'<div class="card"><span class="label">{PROMPT_TITLES[kind]}</span>'
                f"{_text(first.prompt)}{_table(['policy', 'answer', 'PM score', 'P(evasive)'], rows)}</div>"
            )
    return "<h2>Sample answers</h2>\n" + "\n".join(cards)


def _sample_judgements_section(judgements: Sequence[Judgement]) -> str:
    if not judgements:
        return ""
    cards = []
    for j in judgements:
        reasoning = "".join(
            f'<span class="label">Reasoning with {escape(j.policy_a)} shown {order}</span>{_text(text)}'
            for order, text in zip(("first", "second"), j.score.reasoning)
        )
        cards.append(
            f'<div class="card"><div class="title">{CRITERION_TITLES[j.criterion].capitalize()}, principle '
            f"<code>{escape(j.principle_id)}</code>: {escape(j.policy_a)} vs {escape(j.policy_b)} — "
            f"P({escape(j.policy_a)} better) = {j.label:.3f} "
            f'<span class="muted">({escape(j.policy_a)} shown first: {j.score.p_a_first:.3f}, shown second: '
            f"{j.score.p_a_second:.3f})</span></div>"
            f'<span class="label">Prompt</span>{_text(j.prompt)}'
            f'<span class="label">A: {escape(j.policy_a)}</span>{_text(j.answer_a)}'
            f'<span class="label">B: {escape(j.policy_b)}</span>{_text(j.answer_b)}{reasoning}</div>'
        )
    return (
        "<h2>Sample preference judgements</h2>\n<p>The feedback model's soft labels on sampled prompts, with its "
        "chain of thought when it reasoned.</p>\n" + "\n".join(cards)
    )


def _sample_traces_section(traces: Sequence[Trace]) -> str:
    if not traces:
        return ""
    cards = []
    for trace in traces:
        rounds = "".join(
            f"<h4>Round {i} · principle <code>{escape(r.principle_id)}</code></h4>"
            + (f'<span class="label">Critique</span>{_text(r.critique)}' if r.critique is not None else "")
            + f'<span class="label">Revision</span>{_text(r.revision)}'
            for i, r in enumerate(trace.rounds, start=1)
        )
        cards.append(
            f'<div class="card"><span class="label">Prompt</span>{_text(trace.prompt)}'
            f'<span class="label">Initial answer</span>{_text(trace.initial_answer)}{rounds}'
            f'<span class="label">Final answer</span>{_text(trace.final_answer)}'
            f'<p class="meta">model <code>{escape(trace.model_ref)}</code> · constitution '
            f"<code>{escape(trace.constitution_ref)}</code></p></div>"
        )
    return "<h2>Sample SL-CAI traces</h2>\n" + "\n".join(cards)


# -- building blocks ---------------------------------------------------------------------------------


def _demo_notes(sources: Iterable[str]) -> str:
    """A warning line for each source that is one of the project's demo sets, not real data."""
    notes = filter(None, map(demo_set_note, dict.fromkeys(sources)))
    return "".join(f'<p class="warning"><b>Demo data.</b> {escape(note)}</p>' for note in notes)


def _table(headers: Iterable[str], rows: Iterable[Sequence[str]]) -> str:
    """A table from already-escaped header and cell HTML (cells that are `<td ...>` stay as they are)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _num(text: str) -> str:
    return f'<td class="num">{escape(text)}</td>'


def _text(text: str | None) -> str:
    shown = escape(text) if text else '<span class="muted">(empty)</span>'
    return f'<div class="text">{shown}</div>'


def _png(figure, alt: str) -> str:
    """A matplotlib figure as an inline <img>."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="chart" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _figure(width: float, height: float):
    # The object-oriented API renders through Agg without touching pyplot's global backend.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def _grouped_bars(names: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> str:
    figure, ax = _figure(max(4.5, 1.3 * len(names) * max(1, len(series))), 3.2)
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        positions = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(positions, values, width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.axhline(0, color="#555", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(series))
    return _png(figure, title)


def _line(xs: list[int], series: dict[str, list[float]], xlabel: str, ylabel: str, title: str) -> str:
    figure, ax = _figure(5.0, 3.2)
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if len(series) > 1:
        ax.legend(frameon=False)
    ax.set_xticks(xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _png(figure, title)


def _horizontal_bars(labels: list[str], values: list[float], xlabel: str, title: str) -> str:
    figure, ax = _figure(6.5, max(2.0, 0.35 * len(labels) + 1))
    colours = ["#3b7dd8" if v >= 0 else "#d0543f" for v in values]
    ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.axvline(0, color="#555", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _png(figure, title)


def _heatmap(names: list[str], matrix: list[list[float | None]], title: str) -> str:
    figure, ax = _figure(max(3.5, 1.1 * len(names) + 1.5), max(3.0, 0.9 * len(names) + 1))
    values = [[float("nan") if v is None else v for v in row] for row in matrix]
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_title(title)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _png(figure, title)


def _frontier(result: EvaluationResult, names: list[str]) -> str:
    """Harmlessness against helpfulness Elo, each point with its bootstrap intervals; the
    human-feedback references drawn apart from CAI's policies."""
    title = "Harmlessness vs helpfulness Elo (Figs. 2, 3)"
    figure, ax = _figure(5.4, 4.4)
    helpful, harmless = result.elo["helpful"], result.elo["harmless"]
    for name in names:
        x, y = helpful[name], harmless[name]
        span_x = result.elo_intervals.get("helpful", {}).get(name)
        span_y = result.elo_intervals.get("harmless", {}).get(name)
        reference = name in REFERENCE_KINDS
        ax.errorbar(
            [x],
            [y],
            xerr=[[x - span_x[0]], [span_x[1] - x]] if span_x else None,
            yerr=[[y - span_y[0]], [span_y[1] - y]] if span_y else None,
            marker="s" if reference else "o",
            color="#d0543f" if reference else "#3b7dd8",
            capsize=3,
            markersize=7,
        )
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("helpfulness Elo")
    ax.set_ylabel("harmlessness Elo")
    ax.set_title(title)
    # At least ±50 points around the data and its intervals, so near-ties do not look like large gaps.
    for criterion, set_limits in (("helpful", ax.set_xlim), ("harmless", ax.set_ylim)):
        intervals = result.elo_intervals.get(criterion, {}).values()
        values = [result.elo[criterion][n] for n in names] + [v for span in intervals for v in span]
        middle, half = (min(values) + max(values)) / 2, max(50.0, 0.55 * (max(values) - min(values)))
        set_limits(middle - half, middle + half)
    ax.ticklabel_format(useOffset=False, style="plain")
    return _png(figure, title)
