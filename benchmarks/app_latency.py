"""App latency (issue 19): how long a user waits, from a cold start on a fresh workspace and from a warm one.

Cold: `tdx app` on an empty workspace (as the README's first command ends): it builds the demo,
queues the jobs the first pages need and starts its workers. We record the seconds since the
command started until the server answers, until each page's main content shows in Chromium
(Explore's proponents, the Runs table, the Mislabels review, Compare's first method's proponents
and then its two-method agreement and LDS scatter, the Map), and until each queued job is done.
Warm: the same workspace served again (everything stored): the seconds until each page shows, and until
a new query (a block of test samples never scored) shows its TRAK proponents. `--full` does the same for
`tdx demo --full` (the CNN on 60,000 images).
Review keys (issue 29): on the warm start, each verdict key (M, F, A), undo (U) and next / previous (N, P) of Mislabels
and of Explore's example dialog, and the Map's undo (U, its one key), is pressed PRESSES times in Chromium; a row is the
median seconds from the key press until the page shows its answer (the next suspect or example; for U, the undo's toast,
which says how many actions are left, and the end of the run that shows it), on the setting's run. Every verdict is undone afterwards.
--quick measures the demo alone (as the default does). --smoke: a workspace holding one run that
`tdx train` makes in seconds (256 training images, a narrow MLP), Explore only, the cold start's queued
jobs not waited for, then the warm start, two new queries and the M key of Explore's dialog.
Needs Debian's chromium and the playwright package (the dev extra).

    python benchmarks/app_latency.py [--quick | --smoke] [--full] [--settings demo,full] [--jobs-limit S] [--reviews PAGES]
                                     [--json PATH] [--workspace DIR]
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from common import SMOKE_TRAIN, SMOKE_WIDTH, markdown_table, parser, report, workspace_root

from attribution_core.annotations import Annotations
from attribution_core.jobs.queue import ACTIVE, DONE, JobQueue
from attribution_core.jobs.ready import QUERY_BLOCK

ROOT = Path(__file__).resolve().parent.parent
TDX = Path(sys.executable).parent / "tdx"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]
PAGE_TIMEOUT_S = 900

PAGES = [  # (page path, title, the selector or text that means its main content shows)
    ("", "Explore", "text=Proponents: training examples"),
    ("runs", "Runs", "[data-testid=stDataFrame]"),
    ("mislabels", "Mislabels", "text=/Suspect 1 of/"),
    ("compare", "Compare", '[class*="st-key-grid_compare_"] img'),  # a method's proponents
    ("map", "Map", ".st-key-map_chart .scatterlayer .point, .st-key-map_chart canvas.gl-canvas-context"),  # SVG, or WebGL when large
]
AGREEMENT = ("compare", "Compare's two-method agreement", "text=/agree on/")
"""Compare shows a method's proponents as soon as one method has scored (a large run: representation similarity at once);
the agreement of two needs the second's fit too, so it is its own row."""
LDS_SCATTER = ("compare", "Compare's LDS scatter", ".st-key-lds_scatter .scatterlayer .point")
"""Where a ground truth was queued with the run (the demo), Compare's LDS scatter must show without a button press too."""
JSON_KEYS = ("results", "review_keys", "cold_full")
PRESSES = 5
"""Each review key is pressed this many times on a warm app; its row is the median."""
REVIEW_TIMEOUT_MS = 120_000


@dataclass(frozen=True)
class Setting:
    """A workspace to measure: its run, a test sample in a block never scored, how it is built and which pages are timed."""

    run_id: str
    new_query: int
    prepare: tuple[str, ...]
    """tdx arguments that build the workspace before the cold start; none: the cold start builds the demo itself."""
    pages: tuple[tuple[str, str, str], ...]
    reviews: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(page, its keys in the order pressed) of the review keys measured on the warm start (REVIEW_PAGES says how)."""


REVIEWS = (("Mislabels", ("M", "F", "A", "P", "N", "U")), ("Explore dialog", ("M", "F", "A", "P", "N", "U")), ("Map", ("U",)))
"""Every review key of each page, verdicts first (so that P, N and U have something to do)."""

SETTINGS = {
    "demo": Setting("fmnist-mlp", 7 * QUERY_BLOCK + 3, (), (*PAGES, AGREEMENT, LDS_SCATTER), REVIEWS),
    "full": Setting("fmnist-cnn-full", 200 * QUERY_BLOCK + 3, ("demo", "--full"), (*PAGES, AGREEMENT), REVIEWS),
    "smoke": Setting("smoke-mlp", QUERY_BLOCK + 3, ("train", "smoke-mlp", "--data", "sample", "--max-train", str(SMOKE_TRAIN),
                                                   "--max-test", str(2 * QUERY_BLOCK), "--hidden", str(SMOKE_WIDTH), "--epochs", "3",
                                                   "--checkpoints", "3"), tuple(PAGES[:1]), (("Explore dialog", ("M", "U")),)),
}
"""The smoke run's test set holds two blocks of queries: its new query's block is never scored at the start."""


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(workspace: Path, log: Path) -> Iterator[tuple[str, float, float]]:
    """`tdx app` on a free port; yields (url, the command's start time, seconds until /_stcore/health answered)."""
    port = _port()
    started = time.monotonic()
    with open(log, "w") as output:
        server = subprocess.Popen([str(TDX), "app", "--port", str(port), "--workspace", str(workspace)], cwd=ROOT,  # noqa: S603
                                  stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"tdx app exited:\n{log.read_text()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):  # noqa: S310
                break
            time.sleep(0.1)
        yield url, started, time.monotonic() - started
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def page_seconds(browser, url: str, setting: Setting, started: float) -> list[tuple[str, float, float]]:
    """(page, seconds from opening it until its main content shows, seconds since the server's start) per page, in a fresh tab."""
    rows = []
    tab = browser.new_page(viewport={"width": 1500, "height": 1100})
    for path, title, shown in setting.pages:
        opened = time.monotonic()
        tab.goto(f"{url}/{path}?run={setting.run_id}")
        tab.locator(shown).first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
        rows.append((title, time.monotonic() - opened, time.monotonic() - started))
    tab.close()
    return rows


NEW_QUERY_SHOWN = """query => {
  const fresh = [...document.querySelectorAll('[data-testid=stElementContainer]:not([data-stale=true])')];
  const card = fresh.some(e => [...e.querySelectorAll('[data-testid=stImageCaption]')].some(c => c.innerText.trim() === `test ${query}`));
  const grid = fresh.some(e => e.innerText.startsWith('Proponents: training examples'));
  return card && grid && !document.querySelector('[class*="st-key-job_"]');
}"""
"""In the page as drawn now (not the greyed-out elements of the previous script run): the query's card, its proponents, no job panel."""


def query_click_seconds(browser, url: str, run_id: str, queries: list[int]) -> list[float]:
    """Seconds from choosing each test sample in turn, in Explore's open page, until its TRAK proponents show."""
    tab = browser.new_page(viewport={"width": 1500, "height": 1100})
    tab.goto(f"{url}/?run={run_id}&method=trak")
    tab.get_by_text("Proponents: training examples").first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
    selector = tab.locator("[data-testid=stSelectbox]").filter(has_text="Test sample").locator("input")
    seconds = []
    for query in queries:
        selector.click()
        selector.fill(f"test {query} ·")
        tab.get_by_role("option", name=f"test {query} ·").first.wait_for()
        opened = time.monotonic()
        selector.press("Enter")
        tab.wait_for_function(NEW_QUERY_SHOWN, arg=query, timeout=PAGE_TIMEOUT_S * 1000, polling=50)
        seconds.append(time.monotonic() - opened)
    tab.close()
    return seconds


SCRIPT_FINISHED = """() => {
  const state = document.querySelector('[data-testid=stApp]')?.getAttribute('data-test-script-state');
  return state != null && state !== 'running' && state !== 'initial';
}"""
"""Streamlit's script run has finished (as tests/browser/page_scripts.py waits for it)."""
SETTLED = """() => !document.querySelector('[data-testid=stSkeletonElement], [data-testid=stSkeleton]')
    && [...document.querySelectorAll('[data-testid=stImage] img')].every(image => image.complete && image.naturalWidth > 0)"""
"""Every element's code has come (no skeleton left) and every image has loaded: the page's buttons, and their keys, are there."""
SHOWS = """([pattern, toast]) => {
  const re = new RegExp(pattern);
  const fresh = [...document.querySelectorAll('[data-testid=stElementContainer]:not([data-stale=true])')];
  const text = !pattern || fresh.some(e => re.test(e.innerText));
  const toasted = !toast || [...document.querySelectorAll('[data-testid=stToast]')].some(t => t.innerText.includes(toast));
  return text && toasted;
}"""
"""The page as drawn now (not the greyed-out elements of a run in progress) shows text matching `pattern` (none: any), and a toast
holds `toast` (none: no toast needed; pass a text no earlier toast held)."""
VERDICT_KEYS = {"M": "mislabeled", "F": "fine", "A": "ambiguous"}
"""The verdict keys measured (flagging.VERDICT_KEYS) and their verdicts."""


def undone(left: int) -> str:
    """What the toast of an undo says when `left` actions of the tab are left to undo (flagging.undo_last): one toast's own text."""
    return "verdict; nothing more to undo" if not left else f"verdict; {left} more action"


def press(tab, key: str, pattern: str | None, toast: str | None) -> float:
    """Seconds from pressing `key` until SHOWS(pattern, toast) holds, and with a toast until the run that shows it has finished
    (a page shows its toast when its run begins: the rest of the answer, an undone flag's colour on the map, comes after).
    Then, untimed, until the run has finished and the page has settled."""
    pressed = time.monotonic()
    tab.keyboard.press(key.lower())
    tab.wait_for_function(SHOWS, arg=[pattern, toast], timeout=REVIEW_TIMEOUT_MS, polling=20)
    if toast is not None:
        tab.wait_for_function(SCRIPT_FINISHED, timeout=REVIEW_TIMEOUT_MS, polling=20)
    seconds = time.monotonic() - pressed
    tab.wait_for_function(SCRIPT_FINISHED, timeout=REVIEW_TIMEOUT_MS)
    tab.wait_for_function(SETTLED, timeout=REVIEW_TIMEOUT_MS)
    return seconds


def position(tab, pattern: str) -> tuple[int, int]:
    """(k, n) of the first fresh text matching `pattern`, whose two groups are a position and a count ("Suspect 3 of 600")."""
    tab.wait_for_function(SHOWS, arg=[pattern, None], timeout=REVIEW_TIMEOUT_MS)
    text = tab.evaluate("""pattern => { const re = new RegExp(pattern);
        const fresh = document.querySelectorAll('[data-testid=stElementContainer]:not([data-stale=true])');
        const hit = [...fresh].find(e => re.test(e.innerText));
        return hit ? hit.innerText : ''; }""", pattern)
    found = re.search(pattern, text)
    return int(found.group(1)), int(found.group(2))


def stepped_keys(tab, where: str, keys: tuple[str, ...], shown: str) -> dict[str, list[float]]:
    """Seconds per press of each key in a review that shows its place as `shown` % (k, n) ("Suspect %d of %d").

    A verdict (saved in the callback that moves on) or N shows k + 1, P k - 1 (an unmeasured P or N first where the step
    would leave the list), U its toast. Returns {key: seconds per press}; undoes every verdict it gave (unmeasured beyond the U presses).
    """
    any_place = re.escape(shown).replace("%d", r"(\d+)")
    given, seconds = 0, {}
    for key in keys:
        seconds[key] = []
        for _ in range(PRESSES):
            k, n = position(tab, any_place)
            if key == "U":
                if not given:
                    break
                given -= 1
                seconds[key].append(press(tab, key, None, undone(given)))
                continue
            if key != "P" and k == n:
                press(tab, "P", re.escape(shown % (k - 1, n)), None)
                k -= 1
            elif key == "P" and k == 1:
                press(tab, "N", re.escape(shown % (k + 1, n)), None)
                k += 1
            target = k - 1 if key == "P" else k + 1
            seconds[key].append(press(tab, key, re.escape(shown % (target, n)), None))  # a verdict moves on once it is saved
            given += key in VERDICT_KEYS
    for left in reversed(range(given)):  # leave the flags as they were
        press(tab, "U", None, undone(left))
    print(f"{where}: " + ", ".join(f"{key} {statistics.median(times):.2f} s" for key, times in seconds.items() if times), flush=True)
    return seconds


def mislabels_keys(browser, url: str, run_id: str, keys: tuple[str, ...], workspace: Path) -> dict[str, list[float]]:
    """The Mislabels review card's keys, from its first suspect."""
    tab = browser.new_page(viewport={"width": 1500, "height": 1100})
    tab.goto(f"{url}/mislabels?run={run_id}")
    tab.get_by_text(re.compile("^Suspect 1 of")).first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
    tab.wait_for_function(SCRIPT_FINISHED, timeout=PAGE_TIMEOUT_S * 1000)
    tab.wait_for_function(SETTLED, timeout=PAGE_TIMEOUT_S * 1000)
    seconds = stepped_keys(tab, "Mislabels", keys, "Suspect %d of %d")
    tab.close()
    return seconds


def explore_dialog_keys(browser, url: str, run_id: str, keys: tuple[str, ...], workspace: Path) -> dict[str, list[float]]:
    """Explore's example dialog, opened with O (the first proponent not yet reviewed): its keys walk the proponents."""
    tab = browser.new_page(viewport={"width": 1500, "height": 1100})
    tab.goto(f"{url}/?run={run_id}&method=trak")
    tab.get_by_text("Proponents: training examples").first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
    tab.wait_for_function(SCRIPT_FINISHED, timeout=PAGE_TIMEOUT_S * 1000)
    tab.wait_for_function(SETTLED, timeout=PAGE_TIMEOUT_S * 1000)
    tab.keyboard.press("o")
    tab.get_by_role("dialog").get_by_text(re.compile(r"\d+ of \d+ in this grid")).wait_for(timeout=REVIEW_TIMEOUT_MS)
    seconds = stepped_keys(tab, "Explore dialog", keys, "%d of %d in this grid")
    tab.close()
    return seconds


def map_keys(browser, url: str, run_id: str, keys: tuple[str, ...], workspace: Path) -> dict[str, list[float]]:
    """The Map's undo key (its only review key: its example dialog's verdicts are buttons): each undoes a flag of the linked example
    given with the bulk flag button beside it (clicked PRESSES times first, unmeasured)."""
    tab = browser.new_page(viewport={"width": 1500, "height": 1100})
    tab.goto(f"{url}/map?run={run_id}&example=0")
    flag = tab.locator(".st-key-map_flag_selection button")
    flag.first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
    tab.wait_for_function(SCRIPT_FINISHED, timeout=PAGE_TIMEOUT_S * 1000)
    tab.wait_for_function(SETTLED, timeout=PAGE_TIMEOUT_S * 1000)
    store = Annotations(workspace / "annotations.sqlite")
    for _ in range(PRESSES):
        before = store.undoable_actions(run_id)
        flag.first.click()
        deadline = time.monotonic() + REVIEW_TIMEOUT_MS / 1000
        while store.undoable_actions(run_id) == before and time.monotonic() < deadline:  # the click's flag is saved (its run began)
            time.sleep(0.05)
        tab.wait_for_function(SCRIPT_FINISHED, timeout=REVIEW_TIMEOUT_MS)
        tab.wait_for_function(SETTLED, timeout=REVIEW_TIMEOUT_MS)
    seconds = {key: [press(tab, key, None, undone(left)) for left in reversed(range(PRESSES))] for key in keys if key == "U"}
    print("Map: " + ", ".join(f"{key} {statistics.median(times):.2f} s" for key, times in seconds.items()), flush=True)
    tab.close()
    return seconds


REVIEW_PAGES = {"Mislabels": mislabels_keys, "Explore dialog": explore_dialog_keys, "Map": map_keys}
"""How each page's review keys are pressed and timed."""


def review_seconds(browser, url: str, setting: Setting, workspace: Path) -> dict[str, list[float]]:
    """{"<page> <key>": seconds per press} of the setting's review pages, on a warm app."""
    rows = {}
    for page, keys in setting.reviews:
        for key, seconds in REVIEW_PAGES[page](browser, url, setting.run_id, keys, workspace).items():
            rows[f"{page} {key}"] = seconds
    return rows


def wait_for_jobs(workspace: Path, started_wall: float, limit_s: float) -> list[tuple[str, str, str, float]]:
    """Wait until the queue is empty (or limit_s); (run, kind, title, seconds after the start it was done) per finished job."""
    queue = JobQueue(workspace)
    deadline = time.monotonic() + limit_s
    while queue.jobs(states=ACTIVE) and time.monotonic() < deadline:
        time.sleep(1)
    # a reused workspace holds jobs done in an earlier run of this script: they are not this start's
    return sorted(((job.spec.run_id, job.spec.kind, job.spec.title, job.finished - started_wall) for job in queue.jobs(states=(DONE,))
                   if job.finished >= started_wall), key=lambda row: row[3])


def job_summary(done: list[tuple[str, str, str, float]]) -> list[list[object]]:
    """Per run and kind: how many jobs, and seconds after the start until the last of them was done."""
    last: dict[tuple[str, str], list[float]] = {}
    for run_id, kind, _, seconds in done:
        last.setdefault((run_id, kind), []).append(seconds)
    return [[run_id, kind, len(times), max(times)] for (run_id, kind), times in sorted(last.items(), key=lambda item: max(item[1]))]


def measure(name: str, setting: Setting, workspace: Path, jobs_limit_s: float, browser) -> dict:
    """The cold and the warm start of one setting."""
    result: dict = {"setting": name, "run": setting.run_id}
    workspace.parent.mkdir(parents=True, exist_ok=True)
    started_wall = time.time()
    if setting.prepare:
        built = time.monotonic()
        subprocess.run([str(TDX), *setting.prepare, "--workspace", str(workspace)], check=True, cwd=ROOT,  # noqa: S603
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result["prepare"] = (shlex.join(["tdx", *setting.prepare]), time.monotonic() - built)
    with serve(workspace, workspace.parent / f"{name}-cold.log") as (url, started, healthy):
        result["cold_healthy"] = healthy
        result["cold_pages"] = page_seconds(browser, url, setting, started)
        result["jobs"] = wait_for_jobs(workspace, started_wall, jobs_limit_s)
        result["jobs_left"] = len(JobQueue(workspace).jobs(states=ACTIVE))
    with serve(workspace, workspace.parent / f"{name}-warm.log") as (url, started, healthy):
        result["warm_healthy"] = healthy
        result["warm_pages"] = page_seconds(browser, url, setting, started)
        queries = [setting.new_query, setting.new_query + 1]
        result["new_query"] = (setting.new_query, *query_click_seconds(browser, url, setting.run_id, queries))
        result["review_keys"] = review_seconds(browser, url, setting, workspace)
    return result


def section(result: dict) -> str:
    """The markdown of one setting."""
    setting, run_id = result["setting"], result["run"]
    lines = [f"### {setting}: run {run_id}"]
    if "prepare" in result:
        command, seconds = result["prepare"]
        lines.append(f"`{command}` (before the cold start): {seconds:.0f} s.")
    rows = [["cold", "server answers (health)", "", result["cold_healthy"]]]
    rows += [["cold", f"{title} shows", seconds, since] for title, seconds, since in result["cold_pages"]]
    rows += [["warm", "server answers (health)", "", result["warm_healthy"]]]
    rows += [["warm", f"{title} shows", seconds, since] for title, seconds, since in result["warm_pages"]]
    query, new_block, same_block = result["new_query"]
    rows += [["warm", f"Explore: test {query} chosen in the open page (its block never scored) shows TRAK's proponents", new_block, ""],
             ["warm", f"Explore: then test {query + 1} (the same block, now stored)", same_block, ""]]
    lines += ["", markdown_table(["start", "what", "seconds after opening the page", "seconds after `tdx app` started"], rows)]
    if result.get("review_keys"):
        lines += ["", f"Review keys on the warm start, seconds from the key press until the page shows the answer ({PRESSES} presses):", "",
                  markdown_table(["page", "key", "median", "slowest"], [[*name.rsplit(" ", 1), statistics.median(times), max(times)]
                                                                         for name, times in result["review_keys"].items() if times])]
    lines += ["", "Queued jobs, seconds after the cold `tdx app` started until the last of each kind was done"
              + (f" ({result['jobs_left']} still running or waiting at the limit)" if result["jobs_left"] else "") + ":", "",
              markdown_table(["run", "job kind", "jobs", "done after (s)"], job_summary(result["jobs"]))]
    return "\n".join(lines)


def first_page(pages: tuple[tuple[str, str, str], ...], title: str | None) -> tuple[tuple[str, str, str], ...]:
    """The pages in the order the cold start opens them: the one titled `title` first (none: as they are)."""
    return tuple(sorted(pages, key=lambda page: page[1] != title)) if title else pages


def review_name(setting: str, name: str) -> str:
    """"<page> <key>" of a review row: the demo's and the smoke run's as they are, another setting's named ("Mislabels (full) M")."""
    if setting in ("demo", "smoke"):
        return name
    page, key = name.rsplit(" ", 1)
    return f"{page} ({setting}) {key}"


def main() -> None:
    """Measure the demo (and the full run with --full) and report."""
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--full", action="store_true", help="also measure `tdx demo --full` (trains a CNN on 60,000 images)")
    arguments.add_argument("--settings", default="demo", help="comma-separated: demo (the sample's runs), full (as --full)")
    arguments.add_argument("--jobs-limit", type=float, default=3600, help="seconds to wait for the queued jobs of a cold start")
    arguments.add_argument("--first", default=None, choices=[title for _, title, _ in PAGES],
                           help="open this page first on the cold start (say, Map: its layout's time from a cold `tdx app`)")
    arguments.add_argument("--reviews", default=",".join(REVIEW_PAGES),
                           help=f"comma-separated pages whose review keys are timed on the warm start (of {', '.join(REVIEW_PAGES)}; "
                                "empty: none)")
    args = arguments.parse_args()
    from playwright.sync_api import sync_playwright

    named = [name for name in args.settings.split(",") if name in ("demo", "full")]
    chosen = ["smoke"] if args.smoke else named + (["full"] if args.full else [])
    jobs_limit = 0 if args.smoke else args.jobs_limit  # a smoke run does not wait for the cold start's jobs
    results = []
    with workspace_root(args.workspace) as root, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        for name in dict.fromkeys(chosen):
            setting = SETTINGS[name]
            setting = replace(setting, reviews=tuple(review for review in setting.reviews if review[0] in args.reviews.split(",")),
                              pages=first_page(setting.pages, args.first))
            results.append(measure(name, setting, root / name / "workspace", jobs_limit, browser))
        browser.close()
    body = ("Seconds a user waits, measured in Chromium against `tdx app` (targets, issue 19: a page opens in ≤ 5 s, a click "
            "answers in ≤ 2 s, the Map and the LDS plot without a button press). A page shows when its main content is drawn: "
            "Explore's proponents, the runs table, the first suspect, Compare's first method's proponents, the map's points; "
            "Compare's agreement of two methods and its LDS scatter have rows of their own.\n\n"
            + "\n\n".join(section(result) for result in results))
    review_keys = {review_name(result["setting"], name): statistics.median(times)
                   for result in results for name, times in result.get("review_keys", {}).items() if times}
    cold_full = {title: seconds for result in results if result["setting"] == "full" for title, seconds, _ in result["cold_pages"]}
    report("app_latency", "App latency (cold and warm start)", body, args,
           {"results": results, "review_keys": review_keys, "cold_full": cold_full})


if __name__ == "__main__":
    main()
