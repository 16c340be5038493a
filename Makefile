# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
SAMPLE := var/exports/shapes

# Embedded Airflow for the demo and `make airflow`: SQLite under var/airflow, this project's
# dags/ and plugins/. (Tests make their own throw-away AIRFLOW_HOME.)
export AIRFLOW_HOME ?= $(CURDIR)/var/airflow
export AIRFLOW__CORE__DAGS_FOLDER ?= $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER ?= $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN ?= sqlite:///$(AIRFLOW_HOME)/airflow.db
export TF_USE_LEGACY_KERAS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: venv browser sample demo test test-fast airflow bench clean

# pip is the last thing `venv` writes: a venv interrupted before it is made again, not reused.
$(BIN)/pip:
	$(PYTHON) -m venv --clear $(VENV)

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/pip
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# Debian's Chromium and its chromedriver for the real-browser UI test (tests/e2e/
# test_browser_ui.py drives them with Selenium; nothing downloads a browser of its own).
BROWSER_PACKAGES := chromium chromium-driver
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y \
	    -qq --no-install-recommends $(BROWSER_PACKAGES) > /dev/null; fi

$(SAMPLE)/_SUCCESS: | $(VENV)/.installed
	odapi sample --out $(SAMPLE) --count 200 --seed 0

sample: $(SAMPLE)/_SUCCESS

$(AIRFLOW_HOME)/airflow.db: | $(VENV)/.installed
	mkdir -p $(AIRFLOW_HOME)
	airflow db migrate > $(AIRFLOW_HOME)/migrate.log 2>&1 || (cat $(AIRFLOW_HOME)/migrate.log; exit 1)
	airflow pools set gpu 1 "GPU training: one at a time" >> $(AIRFLOW_HOME)/migrate.log 2>&1

# Runs odapi_retrain once in the embedded Airflow on the sample data, then summarizes the run.
demo: venv sample $(AIRFLOW_HOME)/airflow.db
	@start=$$(date +%s); \
	airflow dags test odapi_retrain -c '{"take_exports": "all"}' 2>&1 | tee var/demo.log | grep --line-buffered -E \
	  "DAG TEST\] starting task|progress: step|AP50|promoted:|report:|pushed|stable ->|ERROR|error:|DagRun failed" \
	  | grep --line-buffered -v cuInit; \
	status=$${PIPESTATUS[0]}; \
	echo "odapi_retrain finished in $$(( $$(date +%s) - start )) s (full log: var/demo.log)"; \
	odapi summary --runs var/runs --text > /dev/null; \
	exit $$status

test: venv browser
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

# Airflow UI on http://localhost:8080 with this project's DAGs (admin password is printed, and
# kept in $(AIRFLOW_HOME)/simple_auth_manager_passwords.json.generated).
airflow: venv sample
	airflow standalone

bench: venv
	$(BIN)/python bench/run.py

clean:
	rm -rf var
