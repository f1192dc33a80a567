# Two commands on a fresh machine: `make demo` (set up, start the dashboard, train on the built-in
# data, write the explorer page) and `make test` (set up, then run the tests). Both only need
# python3 (3.9+) with venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test notebook
setup: $(VENV)/.installed

# visdom 0.2.4 only builds with setuptools<81: the constraint reaches pip's build environments too
$(VENV)/.installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/python -m pip install -q -r requirements.txt
	# the dashboard's front end, from the npm registry, so visdom never reaches for a CDN
	$(BIN)/python visdom_server.py --install_static || echo "dashboard front end not installed (needs npm); training works without it"
	touch $@

# the dashboard in the background (unless one runs), the quick run, then the explorer page of its model
demo: setup
	$(BIN)/python visdom_server.py --background || echo "no dashboard; training works without it"
	$(BIN)/python main.py --preset quick
	$(BIN)/python visualize_attn.py --checkpoint models/quick/latest.pt --view html --out samples/quick/explorer.html

test: setup
	$(BIN)/python -m pytest -q tests

# the attention notebook in JupyterLab, on the newest checkpoint under models/ (`make demo` leaves
# models/quick/latest.pt; SAGAN_CHECKPOINT=path picks another)
# (trusted, so its outputs' scripts run; --allow-root only where make runs as root, as in containers)
notebook: setup
	$(BIN)/jupyter trust visualize_attn.ipynb
	$(BIN)/jupyter lab $$([ "$$(id -u)" = 0 ] && echo --allow-root) visualize_attn.ipynb
