"""The notebooks' widgets, live, in a real browser.

Starts JupyterLab from this interpreter's environment on 127.0.0.1 (a free port, a random token, the root a
temporary copy of notebooks/), drives it with Playwright's Python API and the system Chromium (Debian's
``chromium``; Playwright's own browser download is not needed), and for each chosen notebook: runs all cells
with the committed parameters (``PROFILE = "quick"``), checks that no cell shows an error, then moves each
slider and changes each dropdown of every ``interact`` widget and checks that the widget's output image
changed.
Screenshots go to ``artifacts/browser/``.

Knobs (environment): ``CAUSALIR_BROWSER_NOTEBOOKS`` (notebook numbers, default ``00 07 09``),
``CAUSALIR_CHROMIUM`` (the executable, default ``/usr/bin/chromium`` or ``chromium`` on PATH),
``CAUSALIR_BROWSER_RUN_TIMEOUT`` (seconds for one notebook's "run all", default 480).
Without Chromium or Playwright the test skips, unless ``CI=true``: then it fails.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SHOTS = Path(os.environ.get("CAUSALIR_ARTIFACTS", ROOT / "artifacts")) / "browser"
CHOSEN = os.environ.get("CAUSALIR_BROWSER_NOTEBOOKS", "00 07 09").split()
RUN_TIMEOUT_S = float(os.environ.get("CAUSALIR_BROWSER_RUN_TIMEOUT", "480"))
WIDGET_TIMEOUT_S = 120.0  # one widget callback (re-render after a control moved)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(why: str):
    """Skip locally; in CI a missing browser stack is a failure, not a skip."""
    msg = f"browser test needs {why}"
    if IN_CI:
        pytest.fail(msg + " (CI=true: install it, see .ci/run)", pytrace=False)
    pytest.skip(msg + " (apt-get install chromium; pip install -e '.[browser]'); skipped outside CI")


def _chromium() -> str:
    exe = os.environ.get("CAUSALIR_CHROMIUM") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium"))
    if not exe or not os.access(exe, os.X_OK):
        _unavailable("Chromium at /usr/bin/chromium (or $CAUSALIR_CHROMIUM)")
    return exe


def _notebook(num: str) -> Path:
    hits = sorted(NOTEBOOKS.glob(f"{num}_*.ipynb"))
    assert len(hits) == 1, f"notebook {num!r}: expected one notebooks/{num}_*.ipynb, found {hits}"
    return hits[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop the server we started (its PID; it leads its own process group, which holds its kernels)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # jupyter shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)
    try:  # a kernel left behind in the group the server led
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def lab():
    """JupyterLab on 127.0.0.1 serving a temporary copy of notebooks/; yields (base_url, token)."""
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        _unavailable("JupyterLab in this environment (pip install -e '.[notebooks]')")
    shutil.rmtree(SHOTS, ignore_errors=True)  # this run's screenshots only
    SHOTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="causalir-browser-"))
    root = tmp / "notebooks"
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    settings = tmp / "lab-settings"
    for rel, value in {
        # every cell stays in the DOM (no virtual scrolling), no news or update pop-ups
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                           "checkForUpdates": False},
    }.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(value))
    env = dict(os.environ)
    for k in ("CAUSALIR_HEADLESS", "MPLBACKEND", "JUPYTER_CONFIG_DIR", "JUPYTER_PATH"):
        env.pop(k, None)  # live widgets, the inline backend
    env.update(
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        CAUSALIR_ARTIFACTS=str(tmp / "artifacts"),  # what the notebooks write stays out of the repo
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
        IPYTHONDIR=str(tmp / "ipython"),
        PYTHONUNBUFFERED="1",
    )
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
           f"--port={port}", "--port-retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    base, log_path = f"http://127.0.0.1:{port}", tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab not up after 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, token
    finally:
        _stop(proc)
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, SHOTS / "jupyterlab-server.log")
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright (pip install -e '.[browser]')")
    exe = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, timeout=60_000,
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


# JavaScript run in the page (JupyterLab exposes its app as window.jupyterapp with expose_app_in_browser).
JS_PANEL_READY = """() => {
  const app = window.jupyterapp; const w = app && app.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!(k && k.status === 'idle' && w.content && w.content.widgets.length);
}"""
JS_RUN_STATE = """() => {
  const w = window.jupyterapp.shell.currentWidget; const k = w.sessionContext.session.kernel;
  const cells = w.content.widgets.filter(
      c => c.model.type === 'code' && c.model.sharedModel.getSource().trim());
  const errors = [];
  cells.forEach((c, i) => { for (const o of c.model.outputs.toJSON())
      if (o.output_type === 'error') errors.push(`code cell ${i}: ${o.ename}: ${o.evalue}`); });
  return {status: k ? k.status : 'dead', done: cells.filter(c => c.model.executionCount !== null).length,
          total: cells.length, errors};
}"""
TRACEBACK = "Traceback (most recent call last)"


def _wait_idle(page, timeout_s: float, what: str) -> dict:
    """Poll until the kernel is idle twice in a row; return the last run state."""
    deadline, idle = time.monotonic() + timeout_s, 0
    while True:
        st = page.evaluate(JS_RUN_STATE)
        if st["errors"]:
            return st
        idle = idle + 1 if st["status"] == "idle" else 0
        if idle >= 2:
            return st
        if st["status"] == "dead" or time.monotonic() > deadline:
            raise AssertionError(f"{what}: kernel {st['status']} after {timeout_s:.0f} s ({st['done']}/"
                                 f"{st['total']} cells ran)")
        time.sleep(1.0)


def _img_src(interact) -> str | None:
    img = interact.locator(".widget-output img")
    return img.first.get_attribute("src") if img.count() else None


def _wait_new_image(page, interact, before: str | None, what: str) -> str:
    deadline = time.monotonic() + WIDGET_TIMEOUT_S
    while time.monotonic() < deadline:
        src = _img_src(interact)
        if src and src != before:
            _wait_idle(page, WIDGET_TIMEOUT_S, what)  # let queued callbacks (a dragged slider) finish
            text = interact.inner_text()
            assert TRACEBACK not in text, f"{what}: the widget's output shows an error:\n{text[-2000:]}"
            return _img_src(interact) or src
        time.sleep(0.5)
    text = interact.inner_text()
    raise AssertionError(f"{what}: the output image did not change within {WIDGET_TIMEOUT_S:.0f} s"
                         + (f"; output:\n{text[-2000:]}" if TRACEBACK in text else ""))


def _drag(page, slider) -> None:
    """Drag the slider's handle about a third of the track away from where it is."""
    handle = slider.locator(".noUi-handle").first
    handle.scroll_into_view_if_needed()
    track = slider.locator(".noUi-target").first.bounding_box()
    hb = handle.bounding_box()
    x0, y = hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2
    frac = (x0 - track["x"]) / max(track["width"], 1)
    x1 = track["x"] + track["width"] * (frac + 0.35 if frac < 0.5 else frac - 0.35)
    page.mouse.move(x0, y)
    page.mouse.down()
    page.mouse.move(x1, y, steps=8)
    page.mouse.up()


@pytest.mark.parametrize("num", CHOSEN)
def test_widgets_live(browser, lab, num):
    src = _notebook(num)
    cells = json.loads(src.read_text())["cells"]
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert params and 'PROFILE = "quick"' in "".join(params[0]["source"]), f"{src.name}: PROFILE is not quick"
    base, token = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    stem = src.stem
    try:
        # a workspace of its own per notebook: the tab of the one before is not restored beside it
        page.goto(f"{base}/lab/workspaces/causalir-{num}/tree/{src.name}?token={token}",
                  wait_until="domcontentloaded", timeout=90_000)
        page.wait_for_function(JS_PANEL_READY, timeout=120_000, polling=500)
        t0 = time.monotonic()
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        st = _wait_idle(page, RUN_TIMEOUT_S, f"{src.name}: run all cells")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not st["errors"] and st["done"] < st["total"] and time.monotonic() < deadline:
            time.sleep(1.0)  # idle between two queued cells: wait for the rest
            st = _wait_idle(page, RUN_TIMEOUT_S, f"{src.name}: run all cells")
        print(f"{src.name}: ran {st['done']}/{st['total']} code cells in {time.monotonic() - t0:.0f} s")
        assert not st["errors"], f"{src.name}: error output: {st['errors']}"
        assert st["done"] == st["total"], f"{src.name}: only {st['done']}/{st['total']} code cells ran"
        outputs = page.locator(".jp-Notebook .jp-OutputArea-output")
        bad = [t for t in outputs.all_inner_texts() if TRACEBACK in t]
        assert not bad, f"{src.name}: a cell shows a traceback:\n{bad[0][-2000:]}"
        assert "(headless run:" not in page.locator(".jp-Notebook").inner_text(), \
            f"{src.name}: nbtools.interact ran headless (CAUSALIR_HEADLESS leaked into the kernel)"

        interacts = page.locator(".jp-Notebook .widget-interact")
        n = interacts.count()
        assert n >= 1, f"{src.name}: no interact widget rendered (is jupyterlab_widgets installed?)"
        changed = 0
        for i in range(n):
            box = interacts.nth(i)
            box.scroll_into_view_if_needed()
            before = _img_src(box)
            if before is None:  # an interact without an image output (text only): not what we test
                continue
            box.screenshot(path=str(SHOTS / f"{stem}-widget{i}-0-initial.png"))
            step = 0
            sliders = box.locator(".widget-slider")
            for j in range(sliders.count()):
                s = sliders.nth(j)
                readout = s.locator(".widget-readout").first
                v0 = readout.inner_text()
                _drag(page, s)
                if readout.inner_text() == v0:  # a one-value slider (min == max): nothing to move
                    continue
                step += 1
                what = f"{src.name} widget {i}: slider {j} {v0} -> {readout.inner_text()}"
                before = _wait_new_image(page, box, before, what)
                box.screenshot(path=str(SHOTS / f"{stem}-widget{i}-{step}-slider{j}.png"))
                changed += 1
            selects = box.locator(".widget-dropdown select")
            for j in range(selects.count()):
                sel = selects.nth(j)
                options = sel.locator("option").all_inner_texts()
                if len(options) < 2:
                    continue
                cur = sel.evaluate("e => e.selectedIndex")
                new = (cur + 1) % len(options)
                sel.select_option(index=new)
                step += 1
                what = f"{src.name} widget {i}: dropdown {j} {options[cur]!r} -> {options[new]!r}"
                before = _wait_new_image(page, box, before, what)
                box.screenshot(path=str(SHOTS / f"{stem}-widget{i}-{step}-dropdown{j}.png"))
                changed += 1
        assert changed, f"{src.name}: no slider or dropdown of an interact widget changed its image"
        st = page.evaluate(JS_RUN_STATE)
        assert not st["errors"], f"{src.name}: error output after moving the widgets: {st['errors']}"
        print(f"{src.name}: {n} interact widget(s), {changed} control change(s) re-rendered the image")
    except BaseException:
        try:
            page.screenshot(path=str(SHOTS / f"{stem}-FAILED.png"), full_page=True)
        except Exception as e:  # noqa: BLE001 - the page may be gone
            print(f"no failure screenshot: {e}")
        if problems:
            print("page errors:", *problems[:10], sep="\n  ")
        raise
    finally:
        try:  # shut this notebook's kernel down before the next one starts (2-core CI)
            page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
        except Exception as e:  # noqa: BLE001
            print(f"kernel shutdown: {e}")
        page.close()
