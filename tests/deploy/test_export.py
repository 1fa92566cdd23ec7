

def test_a_card_names_its_validation_run_without_this_machines_absolute_path(trained_run, tmp_path, monkeypatch):
    from cifarx.deploy.card import validation_figures

    monkeypatch.chdir(tmp_path)  # the run lives outside the current folder
    figures = validation_figures([trained_run["run"].resolve()])
    assert figures["runs"][0]["run"] == f"runs/{trained_run['run'].name}"
    monkeypatch.chdir(trained_run["run"].parent)
    assert validation_figures([trained_run["run"].resolve()])["runs"][0]["run"] == trained_run["run"].name
