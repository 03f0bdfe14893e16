"""App latency (issue 19): how long a user waits, from a cold start on a fresh workspace and from a warm one.

Cold: `tdx app` on an empty workspace (as the README's first command ends): it builds the demo,
queues the jobs the first pages need and starts its workers. We record the seconds since the
command started until the server answers, until each page's main content shows in Chromium
(Explore's proponents, the Runs table, the Mislabels review, Compare's LDS scatter, the Map), and
until each queued job is done. Warm: the same workspace served again (everything stored): the
seconds until each page shows, and until a new query (a block of test samples never scored) shows
its TRAK proponents. `--full` does the same for `tdx demo --full` (the CNN on 60,000 images).
--quick measures the demo alone (as the default does). --smoke: a workspace holding one run that
`tdx train` makes in seconds (256 training images, a narrow MLP), Explore only, the cold start's queued
jobs not waited for, then the warm start and two new queries.
Needs Debian's chromium and the playwright package (the dev extra).

    python benchmarks/app_latency.py [--quick | --smoke] [--full] [--settings demo,full] [--jobs-limit S] [--json PATH] [--workspace DIR]
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common import SMOKE_TRAIN, SMOKE_WIDTH, markdown_table, parser, report, workspace_root

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
    ("compare", "Compare", "text=/agree on/"),
    ("map", "Map", ".st-key-map_chart .scatterlayer .point, .st-key-map_chart canvas.gl-canvas-context"),  # SVG, or WebGL when large
]
LDS_SCATTER = ("compare", "Compare's LDS scatter", ".st-key-lds_scatter .scatterlayer .point")
"""Where a ground truth was queued with the run (the demo), Compare's LDS scatter must show without a button press too."""
JSON_KEYS = ("results",)


@dataclass(frozen=True)
class Setting:
    """A workspace to measure: its run, a test sample in a block never scored, how it is built and which pages are timed."""

    run_id: str
    new_query: int
    prepare: tuple[str, ...]
    """tdx arguments that build the workspace before the cold start; none: the cold start builds the demo itself."""
    pages: tuple[tuple[str, str, str], ...]


SETTINGS = {
    "demo": Setting("fmnist-mlp", 7 * QUERY_BLOCK + 3, (), (*PAGES, LDS_SCATTER)),
    "full": Setting("fmnist-cnn-full", 200 * QUERY_BLOCK + 3, ("demo", "--full"), tuple(PAGES)),
    "smoke": Setting("smoke-mlp", QUERY_BLOCK + 3, ("train", "smoke-mlp", "--data", "sample", "--max-train", str(SMOKE_TRAIN),
                                                   "--max-test", str(2 * QUERY_BLOCK), "--hidden", str(SMOKE_WIDTH), "--epochs", "3",
                                                   "--checkpoints", "3"), tuple(PAGES[:1])),
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


def wait_for_jobs(workspace: Path, started_wall: float, limit_s: float) -> list[tuple[str, str, str, float]]:
    """Wait until the queue is empty (or limit_s); (run, kind, title, seconds after the start it was done) per finished job."""
    queue = JobQueue(workspace)
    deadline = time.monotonic() + limit_s
    while queue.jobs(states=ACTIVE) and time.monotonic() < deadline:
        time.sleep(1)
    return sorted(((job.spec.run_id, job.spec.kind, job.spec.title, job.finished - started_wall) for job in queue.jobs(states=(DONE,))),
                  key=lambda row: row[3])


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
    lines += ["", "Queued jobs, seconds after the cold `tdx app` started until the last of each kind was done"
              + (f" ({result['jobs_left']} still running or waiting at the limit)" if result["jobs_left"] else "") + ":", "",
              markdown_table(["run", "job kind", "jobs", "done after (s)"], job_summary(result["jobs"]))]
    return "\n".join(lines)


def main() -> None:
    """Measure the demo (and the full run with --full) and report."""
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--full", action="store_true", help="also measure `tdx demo --full` (trains a CNN on 60,000 images)")
    arguments.add_argument("--settings", default="demo", help="comma-separated: demo (the sample's runs), full (as --full)")
    arguments.add_argument("--jobs-limit", type=float, default=3600, help="seconds to wait for the queued jobs of a cold start")
    args = arguments.parse_args()
    from playwright.sync_api import sync_playwright

    chosen = ["smoke"] if args.smoke else [name for name in args.settings.split(",") if name in ("demo", "full")] + (["full"] if args.full else [])
    jobs_limit = 0 if args.smoke else args.jobs_limit  # a smoke run does not wait for the cold start's jobs
    results = []
    with workspace_root(args.workspace) as root, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        for name in dict.fromkeys(chosen):
            results.append(measure(name, SETTINGS[name], root / name / "workspace", jobs_limit, browser))
        browser.close()
    body = ("Seconds a user waits, measured in Chromium against `tdx app` (targets, issue 19: a page opens in ≤ 5 s, a click "
            "answers in ≤ 2 s, the Map and the LDS plot without a button press). A page shows when its main content is drawn: "
            "Explore's proponents, the runs table, the first suspect, Compare's LDS scatter, the map's points.\n\n"
            + "\n\n".join(section(result) for result in results))
    report("app_latency", "App latency (cold and warm start)", body, args, {"results": results})


if __name__ == "__main__":
    main()
