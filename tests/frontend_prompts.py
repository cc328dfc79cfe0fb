"""UI-format workflows -> API prompts by ComfyUI's real frontend, in headless Chromium.

The server serves its pinned frontend (comfyui-frontend-package); the page loads each workflow with
``app.loadGraphData`` and converts it with ``app.graphToPrompt``, exactly what the Queue button does (links,
widget values, bypassed and muted nodes, primitive and reroute nodes, frontend-only notes). Needs Debian's
``chromium`` (or CHROMIUM_PATH) and the ``playwright`` Python package (its own browsers are not used);
without them the caller skips.
"""
import contextlib
import os
import shutil

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APP_READY_TIMEOUT_MS = 180_000


def chromium_or_skip() -> str:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("Chromium is not installed (apt-get install chromium, or set CHROMIUM_PATH): the workflows are "
                    "converted to API prompts by ComfyUI's own frontend in a headless browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install playwright; it drives Chromium)")
    return path


@contextlib.contextmanager
def frontend_page(base_url: str, chromium: str):
    """A headless page with ComfyUI's frontend loaded from ``base_url``; page errors raised while it is used
    (not while the frontend starts: 1.27 throws one from a settings callback of its own) are collected in
    ``page.dreamcache_errors``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(base_url + "/", wait_until="load", timeout=APP_READY_TIMEOUT_MS)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas",
                                   timeout=APP_READY_TIMEOUT_MS)
            errors.clear()
            page.dreamcache_errors = errors
            yield page
        finally:
            browser.close()


def load_workflow_in(page, name: str, workflow: dict):
    page.evaluate("async ([workflow, name]) => { await window.app.loadGraphData(workflow, true, true, name); }",
                  [workflow, name])


def frontend_prompts(base_url: str, workflows: dict, chromium: str) -> dict:
    """{name: API prompt} for each {name: UI workflow}, converted by the frontend served at ``base_url``."""
    prompts = {}
    with frontend_page(base_url, chromium) as page:
        for name, workflow in workflows.items():
            load_workflow_in(page, name, workflow)
            prompts[name] = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        errors = list(page.dreamcache_errors)
    assert not errors, f"the frontend raised errors while loading the workflows: {errors}"
    return prompts


def close_open_dialogs(page, attempts: int = 5):
    """Escape any modal the frontend opened on its own (newer frontends open the template browser on a first
    visit, a moment after the app is ready), so clicks reach the page."""
    overlay = page.locator('[data-testid="dialog-overlay"], .p-dialog-mask')
    page.wait_for_timeout(1_000)
    for _ in range(attempts):
        if not overlay.first.is_visible():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(1_000)


def missing_models_listings(base_url: str, workflows: dict, chromium: str) -> dict:
    """{name: text in which the frontend lists the models missing when the workflow is opened, or ""}.

    Frontends up to 1.3x show a "Missing Models" dialog ("folder / file" lines); newer ones (1.5x) show a
    toast whose "View details" opens the workflow's Issues panel, with a "Missing Models" section (a file name
    line, then its folder line). Whichever of the two appears is read: the check follows what the served
    frontend can do, not its version number."""
    shown = {}
    with frontend_page(base_url, chromium) as page:
        for name, workflow in workflows.items():
            close_open_dialogs(page)
            load_workflow_in(page, name, workflow)
            dialog = page.locator(".p-dialog", has_text="Missing Models").first
            details = page.get_by_text("View details").first
            try:
                dialog.or_(details).wait_for(state="visible", timeout=15_000)
            except Exception:  # playwright's TimeoutError: the frontend listed nothing
                shown[name] = ""
                continue
            if dialog.is_visible():
                shown[name] = dialog.inner_text()
                page.keyboard.press("Escape")
                dialog.wait_for(state="hidden", timeout=15_000)
                continue
            details.click()
            page.get_by_text("Missing Models", exact=True).first.wait_for(state="visible", timeout=15_000)
            text = page.evaluate("() => document.body.innerText")
            shown[name] = text[text.index("Missing Models"):]
    return shown
