"""
The status page in a real headless browser (Debian's chromium, driven by
Selenium through Debian's chromium-driver): it shows the hosts of a running
balancer, and a click on "drain" shows the host draining.  A screenshot is
written to artifacts/status-page.png.

The browser calls block, so they run in a thread while the reactor serves
the page.  chromium must be installed (.ci/run installs it): without it this
test fails, it does not skip.
"""

import shutil
from pathlib import Path

from steering import admin_url, events
from support import bounded, rig
from twisted.internet.threads import deferToThread

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    assert chromium and driver, "the browser test needs Debian's chromium and chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,500",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def read_states(driver):
    """
    The state each host row shows, read in one go.
    """
    return driver.execute_script(
        "const s = {};"
        "for (const tr of document.querySelectorAll('#hosts tbody tr[data-host]'))"
        "  s[tr.dataset.host] = tr.querySelector('[data-state]').textContent;"
        "return s;"
    )


def hosts_shown(count):
    """
    A wait condition: the page shows C{count} hosts (their states then).
    """

    def shown(driver):
        states = read_states(driver)
        return states if len(states) == count else False

    return shown


@bounded(90)
async def test_the_page_shows_the_hosts_and_a_click_drains_one(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    async with await rig([dict(name=f"h{i}") for i in range(3)], "--admin-actions") as r:
        for _ in range(6):
            response = await r.predict()
            await response.content()
        addresses = [h.address for h in r.hosts]
        driver = await deferToThread(browser, tmp_path)
        try:
            await deferToThread(driver.get, admin_url(r) + "/")
            states = await deferToThread(WebDriverWait(driver, 20).until, hosts_shown(3))
            assert states == {a: "up" for a in addresses}
            strategy = await deferToThread(lambda: driver.find_element(By.CSS_SELECTOR, "[data-fact=strategy]").text)
            assert strategy == "shortest-delay"

            target = addresses[1]
            button = await deferToThread(
                driver.find_element, By.CSS_SELECTOR, f'tr[data-host="{target}"] button[data-action="drain"]'
            )
            await deferToThread(button.click)
            await deferToThread(WebDriverWait(driver, 20).until, lambda d: read_states(d).get(target) == "draining")
            assert r.fleet.backends[1].draining
            assert [e["action"] for e in events(r, "admin-action")] == ["drain"]
            states = await deferToThread(read_states, driver)
            assert states == {addresses[0]: "up", target: "draining", addresses[2]: "up"}
            # The button now offers to enable it again.
            await deferToThread(
                driver.find_element, By.CSS_SELECTOR, f'tr[data-host="{target}"] button[data-action="enable"]'
            )
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status-page.png"
            assert await deferToThread(driver.save_screenshot, str(shot))
            assert shot.stat().st_size > 5000
        finally:
            await deferToThread(driver.quit)


@bounded(90)
async def test_with_a_token_the_page_asks_for_it_once(tmp_path):
    """
    With --admin-token, the page asks for the token; once given, the page
    works as without one (its requests carry an HttpOnly, SameSite=Strict
    cookie, not the token), and when the token changes it asks again.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    token = "k3y-0f-the-4dmin"
    async with await rig([dict(name=f"h{i}") for i in range(2)], "--admin-actions", "--admin-token", token) as r:
        target = r.hosts[0].address
        driver = await deferToThread(browser, tmp_path)
        try:
            await deferToThread(driver.get, admin_url(r) + "/")
            field = await deferToThread(driver.find_element, By.NAME, "token")
            assert await deferToThread(read_states, driver) == {}
            await deferToThread(field.send_keys, "wrong")
            await deferToThread(field.submit)
            await deferToThread(WebDriverWait(driver, 20).until, lambda d: "That is not the token" in d.page_source)
            field = await deferToThread(driver.find_element, By.NAME, "token")
            await deferToThread(field.send_keys, token)
            await deferToThread(field.submit)
            states = await deferToThread(WebDriverWait(driver, 20).until, hosts_shown(2))
            assert set(states) == {h.address for h in r.hosts}
            assert token not in await deferToThread(lambda: driver.current_url)
            [cookie] = await deferToThread(driver.get_cookies)
            assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == ("imml-admin", True, "Strict")
            assert token not in cookie["value"]
            assert await deferToThread(driver.execute_script, "return document.cookie") == ""

            button = await deferToThread(
                driver.find_element, By.CSS_SELECTOR, f'tr[data-host="{target}"] button[data-action="drain"]'
            )
            await deferToThread(button.click)
            await deferToThread(WebDriverWait(driver, 20).until, lambda d: read_states(d).get(target) == "draining")
            assert r.fleet.backends[0].draining

            # A new token (a reload): the open page asks for it again.
            r.balancer.guard.set_token("a-n3w-t0ken")
            await deferToThread(WebDriverWait(driver, 20).until, lambda d: d.find_elements(By.NAME, "token"))
        finally:
            await deferToThread(driver.quit)
