"""JavaScript conditions the browser tests wait on (Playwright's wait_for_function)."""

SCRIPT_FINISHED = """() => {
    const app = document.querySelector('[data-testid=stApp]');
    const state = app && app.getAttribute('data-test-script-state');
    return state !== null && state !== 'running' && state !== 'initial';
}"""
"""Streamlit's script run has finished (not running, not the initial state)."""

IMAGES_LOADED = """() => !document.querySelector('[data-testid=stSkeletonElement], [data-testid=stSkeleton]')
    && [...document.querySelectorAll('[data-testid=stImage] img')].every(image => image.complete && image.naturalWidth > 0)"""
"""No skeleton placeholder is left and every image on the page has loaded. (stSkeleton holds the place of an element whose
code is still loading: an image grid's cells, captions included, until the image element's script has come.)"""

IMAGES_SETTLED = """() => !document.querySelector('[data-testid=stSkeletonElement], [data-testid=stSkeleton]')
    && [...document.querySelectorAll('[data-testid=stImage] img')].every(image => image.complete)"""
"""No skeleton placeholder is left and every image on the page has loaded or failed to."""

NO_JOB_PANEL = """() => !document.querySelector('[class*="st-key-job_"]')"""
"""No job's progress panel is on the page: nothing the page waits for can end and redraw the whole page (a panel's job
that ends reruns the app, which closes an open table cell and drops what was being typed there)."""
