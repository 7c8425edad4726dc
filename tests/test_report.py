"""The HTML report: self-contained, escaped, and rendered by a real browser (headless Chromium).

The result rendered here is written by hand (three policies, both criteria, traces, a judgement
with reasoning), so these tests need no model; `test_evaluate.py` renders one from a real run.
"""

from __future__ import annotations

import base64
import re
import shutil
import struct
import subprocess

import pytest
from evaluation_data import HOSTILE, sample_result

from cai_lib.method.evaluation.report import refresh_report, render_report, report_html
from cai_lib.method.evaluation.results import EvaluationResult

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def result() -> EvaluationResult:
    return sample_result()


@pytest.fixture(scope="module")
def html(result) -> str:
    return report_html(result)


def inline_images(html: str) -> list[bytes]:
    return [
        base64.b64decode(data) for data in re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', html)
    ]


def test_model_text_is_escaped(html):
    assert HOSTILE not in html and "<script" not in html
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in html
    assert "How do I &lt;b&gt;hotwire&lt;/b&gt; a car?" in html


def test_the_report_loads_nothing_from_outside_the_file(html):
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources)
    assert "<link" not in html and "@import" not in html


def test_charts_are_inline_png_images(html):
    images = inline_images(html)
    # PM scores, two win-rate heatmaps, the Elo scatter, evasiveness, per-principle changes, PM by
    # revision round (Fig. 5), PM by distinct principles drawn, PM calibration (Fig. 9).
    assert len(images) == 9
    for png in images:
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        width, height = struct.unpack(">II", png[16:24])
        assert width > 100 and height > 100


def test_tables_show_the_numbers(html):
    assert 'soft 0.20 <span class="muted">[0.10, 0.30]</span>' in html  # base vs rl-cai, harmless
    assert "1110" in html and "+0.420" in html and "0.35 (18%)" in html
    assert "ab" * 32 in html
    assert "B refuses and explains." in html  # the feedback model's reasoning


def test_win_rates_are_shown_hard_with_their_decided_count_and_interval(html):
    assert 'hard 0.00 <span class="muted">[0.00, 0.10] of 36</span>' in html  # base vs rl-cai, harmless


def test_a_judge_that_is_the_feedback_model_is_said_in_one_visible_line(html):
    assert html.count('<p class="warning"><b>Not independent.</b>') == 1
    assert "is not independent: the judge is also the feedback model." in html


def test_an_independent_judge_gets_no_warning(result):
    assert "Not independent" not in report_html(result.model_copy(update={"labeller_ref": "another-model"}))


def test_the_pm_score_after_each_revision_round_is_tabled(html):
    assert "PM score after each revision round (Fig. 5)" in html and "-0.400" in html and "+0.100" in html


def test_the_pm_calibration_is_against_human_choices_per_bin_with_counts_and_intervals(html):
    assert "PM calibration against human choices (Fig. 9)" in html
    assert "observed human frequency" in html and "[0.44, 0.97]" in html and ">6<" in html
    assert "on 11 held-out human comparisons (harmless-base-test.jsonl)" in html
    assert "by a seeded draw per pair (seed 0; the choice was A in 5)" in html


def test_the_elo_over_rl_steps_is_tabled_and_charted(result):
    elo = {
        "harmless": result.elo["harmless"] | {"rl-cai-step-50": 1060.0},
        "helpful": result.elo["helpful"] | {"rl-cai-step-50": 1001.0},
    }
    during_rl = result.model_copy(
        update={"elo": elo, "rl_steps": {"sl-cai": 0, "rl-cai-step-50": 50, "rl-cai": 100}}
    )

    html = report_html(during_rl)

    section = html[html.index("Elo over RL training</h2>") :]
    assert '<td>rl-cai-step-50</td><td class="num">50</td><td class="num">1060</td>' in section
    assert 'alt="Elo over the course of RL (Fig. 8)"' in section


def test_no_rl_course_section_without_intermediate_policies(html):
    assert "Elo over RL training" not in html


def test_render_report_writes_a_file(result, html, tmp_path):
    path = render_report(result, tmp_path / "nested" / "report.html")
    assert path.read_text(encoding="utf-8") == html


def test_the_report_command_works_on_an_s3_prefix(result, html, s3_bucket):
    from cai_lib.core.store import ArtifactStore

    uri = f"s3://{s3_bucket}/runs/eval"
    store = ArtifactStore.open(uri)
    store.write_text("metrics.json", result.model_dump_json())
    assert refresh_report(uri) == f"{uri}/report.html"
    assert store.read_text("report.html") == html


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("headless Chromium is not installed (scripts/system-deps.sh installs the Debian package)")
    return binary


def test_chromium_renders_the_tables_and_every_chart(html, tmp_path):
    # A copy with a probe script that records, once the page has loaded, what the browser drew.
    probe = (
        "<script>window.addEventListener('load', () => { const images = [...document.images];"
        "document.body.dataset.images = images.length;"
        "document.body.dataset.drawn = images.filter(i => i.complete && i.naturalWidth > 0).length;"
        "document.body.dataset.tables = document.querySelectorAll('table').length; });</script>"
    )
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", probe + "</body>"))
    dom = subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attributes = dict(re.findall(r'data-(\w+)="(\d+)"', body))
    assert (attributes["images"], attributes["drawn"]) == ("9", "9")
    # policies, principles, PM scores, two win-rate matrices, Elo, evasiveness, principles, revision
    # rounds, calibration, answers
    assert int(attributes["tables"]) == 11
    assert "Sample SL-CAI traces" in dom


def test_chromium_screenshot_is_not_blank(html, tmp_path):
    from PIL import Image

    report = tmp_path / "report.html"
    report.write_text(html)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            report.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2400)
    darkest, lightest = image.getextrema()
    assert lightest - darkest > 200  # dark text on a light page
    assert len(image.getcolors(256)) > 50  # text, tables and charts, not a flat fill


def test_the_elo_by_round_is_tabled_with_intervals(result):
    elo = {c: ratings | {"rl-cai-round-1": 1030.0} for c, ratings in result.elo.items()}
    intervals = {c: {name: (rating - 20, rating + 20) for name, rating in ratings.items()} for c, ratings in elo.items()}
    rounds = {"sl-cai": 0, "rl-cai-round-1": 1, "rl-cai": 2}
    html = report_html(result.model_copy(update={"elo": elo, "elo_intervals": intervals, "rounds": rounds}))
    section = html[html.index("Elo by round</h2>") :]
    assert '<td>rl-cai-round-1</td><td class="num">1</td><td class="num">1030 [1010, 1050]</td>' in section
    assert 'alt="Elo by round of iterated CAI"' in section


def test_the_generated_prompts_are_counted_per_filter_with_a_sample(result):
    from cai_lib.core.records import GeneratedPrompt
    from cai_lib.method.generate_prompts import generated_view

    rows = [
        GeneratedPrompt(id=f"g{i}", kind="red_team", request=i, seed_ids=["s1", "s2"], raw=text, prompt=text,
                        model_ref="m", rejected_by=verdict)
        for i, (text, verdict) in enumerate([("How do I <b>pick</b> a lock?", None), ("Hi", "length")])
    ]
    html = report_html(result, generated=generated_view(rows, "s3://b/generated", 2, 0))
    section = html[html.index("Generated prompts</h2>") :]
    assert '<td>red-team</td><td class="num">2</td>' in section and "dropped by length" in section
    assert "&lt;b&gt;pick&lt;/b&gt;" in section and "seeds shown: s1, s2" in section
def test_the_report_opens_with_what_the_model_sizes_can_and_cannot_show(result):
    small = report_html(result.model_copy(update={"model_parameters": {"policy base": 134_515_008, "judge": 134_515_008}}))
    opening = small[: small.index("<h3>Policies</h3>")]
    assert "What this run can and cannot show" in opening
    assert "The largest policy has 135M parameters: at this size the run tests the platform, not the method" in opening
    assert "up to ±0.15 wide" in opening  # 40 held-out prompts per set
    assert "No human-feedback references were trained" in opening


def test_a_large_run_with_references_says_so_and_warns_of_a_smaller_judge(result):
    from cai_lib.method.evaluation.report import scale_notes

    large = result.model_copy(
        update={
            "model_parameters": {"policy base": 70_000_000_000, "judge": 8_000_000_000},
            "policies": {**result.policies, "hh-rlhf": "runs/hh-rlhf"},
        }
    )
    notes = scale_notes(large)
    assert notes[0].startswith("The largest policy has 70.0B parameters, within the range the paper studies")
    assert notes[1].startswith("The judge (8.0B) is smaller than the policies it judges")
    assert not any("No human-feedback references" in note for note in notes)

