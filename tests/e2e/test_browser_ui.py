"""What a user clicks, in a real browser: Debian's Chromium driven by Selenium.

The embedded Airflow api-server (SimpleAuthManager, its own AIRFLOW_HOME and SQLite, this
project's dags/ serialized by `airflow dags reserialize`) is signed into with the generated
admin password, odapi_retrain is triggered from its trigger form, and the run must be listed
as the form made it. A run report written from a small run's files must show every image.

Chromium and chromedriver come from Debian (`make browser`, run by `make test`); Selenium is
given both paths, so nothing downloads a browser or a driver. On a failure the page's
screenshot and HTML are kept in the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import secrets
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

if not os.environ.get("CI"):  # as support.production.require: under CI a missing one fails
    pytest.importorskip("selenium", reason="selenium (requirements.txt) is not installed")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from conftest import ROOT, free_port, prepare_records  # noqa: E402
from support.production import Processes, airflow, wait_until  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
DAG_ID = "odapi_retrain"
WAIT_S = 30  # for one page or element, on a loaded 2-core machine
# What the form is filled with, and what the run's conf must then hold.
FORM = {"take_exports": "all", "train_steps": 7, "dry_run": True,
        "force_reason": "browser test: retrain on every export"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's) under Debian's chromedriver."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `make browser` installs Debian's chromium "
                    "and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@contextmanager
def kept_on_failure(driver: Any, folder: Path, name: str) -> Iterator[None]:
    """On any failure inside, save the page as failed-`name`.png and .html in `folder`."""
    try:
        yield
    except BaseException:
        driver.save_screenshot(str(folder / f"failed-{name}.png"))
        (folder / f"failed-{name}.html").write_text(driver.page_source)
        print(f"browser state kept: {folder}/failed-{name}.png and .html")
        raise


@pytest.fixture(scope="module")
def api_server(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The embedded api-server (UI and REST API) on a free port over this project's dags/:
    its base URL, the admin's password and the component logs."""
    home = tmp_path_factory.mktemp("browser-airflow")
    port = free_port()
    env = {**os.environ,
           "AIRFLOW_HOME": str(home),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32)}
    airflow(env, "db", "migrate")
    processes = Processes(home / "process-logs")
    base = f"http://127.0.0.1:{port}"
    try:
        # The server starts while the DAGs are serialized: neither needs the other.
        processes.start("api-server", env, "api-server", "--host", "127.0.0.1", "--port",
                        str(port), "--workers", "1")
        airflow(env, "dags", "reserialize")
        wait_until(lambda: processes.check_alive() or _answers(f"{base}/api/v2/monitor/health"),
                   timeout=120, what="the api-server to answer", diagnose=processes.logs,
                   interval=1)
        passwords = home / "simple_auth_manager_passwords.json.generated"
        yield {"base": base, "password": json.loads(passwords.read_text())["admin"],
               "logs": processes.logs}
    finally:
        processes.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _api(base: str, token: str, path: str) -> dict:
    request = urllib.request.Request(f"{base}/api/v2/{path}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=WAIT_S) as response:
        return json.loads(response.read())


def _sign_in(driver: Any, base: str, password: str) -> None:
    """The login form SimpleAuthManager shows to a signed-out user."""
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(f"{base}/")
    wait.until(EC.visibility_of_element_located((By.NAME, "username"))).send_keys("admin")
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda d: "/auth/login" not in d.current_url)


def _fill_trigger_form(driver: Any, dialog: Any, run_id: str) -> None:
    """Each kind of field the form has: a select, a number, a checkbox, a text, the run id."""
    def click(element: Any) -> None:  # a control in the dialog's scrolled-out part
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    choice = dialog.find_element(By.NAME, "element_take_exports")  # the select's hidden value
    select = choice.find_element(By.XPATH, "./preceding::input[@role='combobox'][1]")
    select.send_keys(FORM["take_exports"], Keys.ENTER)
    assert choice.get_attribute("value") == FORM["take_exports"]
    increment = dialog.find_element(By.ID, "number-input:element_train_steps:inc")
    steps = dialog.find_element(By.ID, increment.get_attribute("aria-controls"))
    steps.send_keys(Keys.CONTROL, "a")
    steps.send_keys(str(FORM["train_steps"]))
    dry_run = dialog.find_element(By.NAME, "element_dry_run")  # the checkbox's hidden input
    driver.execute_script("arguments[0].click()", dry_run)
    assert dry_run.is_selected()
    dialog.find_element(By.NAME, "element_force_reason").send_keys(FORM["force_reason"])
    click(dialog.find_element(By.CSS_SELECTOR, "[id$=':trigger:advancedOptions']"))
    WebDriverWait(driver, WAIT_S).until(
        EC.visibility_of_element_located((By.NAME, "dagRunId"))).send_keys(run_id)


def test_a_user_signs_in_triggers_odapi_retrain_from_its_form_and_sees_the_run(
        api_server, browser, tmp_path):
    base, wait = api_server["base"], WebDriverWait(browser, WAIT_S)
    run_id = f"browser-ui-{secrets.token_hex(3)}"
    with kept_on_failure(browser, tmp_path, "trigger"):
        _sign_in(browser, base, api_server["password"])
        browser.get(f"{base}/dags/{DAG_ID}")
        wait.until(EC.element_to_be_clickable(
            (By.CSS_SELECTOR, "[data-testid=trigger-dag-button]"))).click()
        dialog = wait.until(EC.visibility_of_element_located(
            (By.CSS_SELECTOR, "[role=dialog][data-state=open]")))
        _fill_trigger_form(browser, dialog, run_id)
        submit = dialog.find_element(By.CSS_SELECTOR, "[data-testid=trigger-dag-submit]")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", submit)
        submit.click()
        wait.until(EC.url_contains(f"/dags/{DAG_ID}/runs/{run_id}"))  # the UI opens the run

        browser.get(f"{base}/dags/{DAG_ID}/runs")  # and the DAG's run list shows it
        row = wait.until(EC.visibility_of_element_located(
            (By.XPATH, f"//tr[.//a[normalize-space()='{run_id}']]")))
        cells = row.text.splitlines()
        assert "Queued" in cells and "Manual" in cells and "admin" in cells, cells

    token = browser.get_cookie("_token")["value"]  # the signed-in user's JWT
    run = _api(base, token, f"dags/{DAG_ID}/dagRuns/{run_id}")
    assert (run["state"], run["run_type"], run["triggered_by"],
            run["triggering_user_name"]) == ("queued", "manual", "ui", "admin")
    assert {key: run["conf"][key] for key in FORM} == FORM
    assert run["conf"]["export_path"] is None  # an untouched field keeps its default


def _small_run_report(root: Path) -> Path:
    """report.html of a small run: real val records, the evaluator's files (detections are
    the truth, shifted), loss events; every section that draws a PNG has data."""
    import tensorflow as tf

    from odapi_operators.core.evaluation.coco_metrics import ground_truth
    from odapi_operators.core.evaluation.evaluate import val_split
    from odapi_operators.core.evaluation.report import build_report

    records = prepare_records(root, count=10)
    truth = ground_truth(*val_split(records))
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
                   "bbox": [a["bbox"][0] + 2, a["bbox"][1] + 2, *a["bbox"][2:]]}
                  for a in truth["annotations"]]
    metrics = {"AP": 0.5, "AP50": 0.7, "eval_images": len(truth["images"]),
               "per_class": {c["name"]: 0.5 for c in truth["categories"]}}
    eval_dir = root / "eval"
    eval_dir.mkdir()
    for name, data in (("metrics.json", metrics), ("detections.json", detections),
                       ("ground_truth.json", truth)):
        (eval_dir / name).write_text(json.dumps(data))
    with tf.summary.create_file_writer(str(root / "model" / "train")).as_default():
        for step in range(1, 6):
            tf.summary.scalar("total_loss", 3.0 / step, step=step)
    return Path(build_report(root / "report", eval_dir, records, model_dir=root / "model",
                             grid_images=4)["report"])


def test_a_run_report_shows_every_image_in_the_browser(browser, tmp_path):
    page = _small_run_report(tmp_path)
    with kept_on_failure(browser, tmp_path, "report"):
        browser.get(page.as_uri())
        images = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const images = [...document.images];
            Promise.all(images.map(i => i.decode().catch(() => null))).then(() => done(
                images.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])));
        """)
        assert sorted(src for src, _, _ in images) == ["loss.png", "per_class_ap.png",
                                                       "slices.png", "val_grid.png"]
        assert [src for src, complete, width in images if not (complete and width > 0)] == []
