"""JavaScript conditions the browser tests wait on (Playwright's wait_for_function)."""

SCRIPT_FINISHED = """() => {
    const app = document.querySelector('[data-testid=stApp]');
    const state = app && app.getAttribute('data-test-script-state');
    return state !== null && state !== 'running' && state !== 'initial';
}"""
"""Streamlit's script run has finished (not running, not the initial state)."""

IMAGES_LOADED = """() => !document.querySelector('[data-testid=stSkeletonElement]')
    && [...document.querySelectorAll('[data-testid=stImage] img')].every(image => image.complete && image.naturalWidth > 0)"""
"""No skeleton placeholder is left and every image on the page has loaded."""

IMAGES_SETTLED = """() => !document.querySelector('[data-testid=stSkeletonElement]')
    && [...document.querySelectorAll('[data-testid=stImage] img')].every(image => image.complete)"""
"""No skeleton placeholder is left and every image on the page has loaded or failed to."""
