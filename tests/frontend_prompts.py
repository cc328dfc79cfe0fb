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


def missing_models_dialogs(base_url: str, workflows: dict, chromium: str) -> dict:
    """{name: text of the "Missing Models" dialog the frontend shows when the workflow is opened, or ""}."""
    shown = {}
    with frontend_page(base_url, chromium) as page:
        for name, workflow in workflows.items():
            load_workflow_in(page, name, workflow)
            dialog = page.locator(".p-dialog", has_text="Missing Models")
            try:
                dialog.first.wait_for(state="visible", timeout=15_000)
                shown[name] = dialog.first.inner_text()
            except Exception:  # playwright's TimeoutError: no dialog
                shown[name] = ""
            page.keyboard.press("Escape")
            dialog.first.wait_for(state="hidden", timeout=15_000)
    return shown
