"""Looking at trained runs: reading a run folder back (:mod:`.runs`), the sentiment evaluation
(:mod:`.sentiment`) and the HTML report and mask viewer (:mod:`.views`). Import from the modules:
they load models and optional packages (VADER) only when used."""
