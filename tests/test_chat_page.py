"""The server's chat page in a real headless browser (Debian's chromium and its driver, through Selenium): it loads,
sends a message, streams the reply, shows the thinking apart from the answer, and tokens/s. A missing browser fails
the test (.ci/run installs it), never skips it."""

import shutil

import pytest
from scripted import ScriptedLLM
from test_server import MODEL, Server

from qwen3gen.server import EngineProcess, create_app

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.fail("the chat page test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_chat_page_streams_the_thinking_apart_from_the_answer(tiny_checkpoint, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    replies = ["<think>\nThe user greets me.\n</think>\n\nHello there!", "Second answer."]
    server = Server(create_app(EngineProcess(ScriptedLLM(tiny_checkpoint, replies)), MODEL))
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: MODEL in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "input").send_keys("Hi!")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: "tok/s" in d.find_element(By.CSS_SELECTOR, ".assistant .stats").text
                   or d.find_elements(By.CSS_SELECTOR, ".assistant .error"))  # fmt: skip
        turn = browser.find_element(By.CSS_SELECTOR, ".assistant")
        assert not turn.find_elements(By.CSS_SELECTOR, ".error"), turn.text
        assert turn.find_element(By.CSS_SELECTOR, ".answer").text == "Hello there!"
        thought = turn.find_element(By.CSS_SELECTOR, "details.thinking .thought")
        assert thought.get_attribute("textContent") == "The user greets me."
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == "Hi!"
        browser.find_element(By.ID, "think").click()  # thinking off for the next turn
        browser.find_element(By.ID, "input").send_keys("And again?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant .stats")) == 2
                   and "tok/s" in d.find_elements(By.CSS_SELECTOR, ".assistant .stats")[1].text)  # fmt: skip
        second = browser.find_elements(By.CSS_SELECTOR, ".assistant")[1]
        assert second.find_element(By.CSS_SELECTOR, ".answer").text == "Second answer."
        assert not second.find_elements(By.CSS_SELECTOR, "details.thinking")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        server.stop()
