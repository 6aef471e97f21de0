from starmerge.report.tables import markdown_table, render_table, row_label

RESULTS = {
    "suite": "demo", "model": "tiny", "seed": 0, "versions": {}, "config": {},
    "tasks": {"news": {"metric": "accuracy", "n": 300}, "sent": {"metric": "accuracy", "n": 300}},
    "rows": [
        {"name": "star", "method": "star", "parameters": {"eta": 40},
         "scores": {"news": 0.95, "sent": 0.8}, "normalized": 98.9, "ci": [97.1, 100.4]},
        {"name": "individual", "scores": {"news": 0.96, "sent": 0.82}},
        {"name": "base", "scores": {"news": 0.5, "sent": 0.4}, "normalized": 50.4,
         "ci": [45.0, 55.25]},
        {"name": "ties", "method": "ties", "scores": {"news": 0.9}, "normalized": 93.75},
    ],
}  # fmt: skip


def test_render_table_rows_columns_and_alignment():
    text = render_table(RESULTS)
    lines = text.splitlines()
    assert lines[0].split() == ["Model", "news", "sent", "Avg", "Normalized", "95%", "CI"]
    assert [line.split()[0] for line in lines[2:]] == ["base", "individual", "star", "ties"]
    assert "star (eta=40)" in text
    star = next(line for line in lines if line.startswith("star"))
    assert star.split()[2:7] == ["95.0", "80.0", "87.5", "98.9", "[97.1,"]
    assert "100.0" in lines[3]  # individual's normalized score is 100 by definition
    ties = lines[5].split()
    assert ties[1:5] == ["90.0", "-", "90.0", "93.8"] and ties[-1] == "-"
    # right-aligned numeric columns: every line has the same length up to the CI column
    assert len({len(line) for line in lines[:3]}) == 1


def test_render_table_without_per_task_columns():
    header = render_table(RESULTS, per_task=False).splitlines()[0]
    assert "news" not in header and "Normalized" in header


def test_markdown_table():
    md = markdown_table(RESULTS).splitlines()
    assert md[0] == "| Model | news | sent | Avg | Normalized | 95% CI |"
    assert md[1] == "| :--- | ---: | ---: | ---: | ---: | ---: |"
    assert md[4].startswith("| star (eta=40) | 95.0 | 80.0 | 87.5 | 98.9 | [97.1, 100.4] |")
    assert len(md) == 6


def test_row_label_does_not_repeat_parameters_in_name():
    assert row_label({"name": "star-eta=40", "parameters": {"eta": 40}}) == "star-eta=40"
    assert row_label({"name": "base"}) == "base"


def test_cost_table_puts_data_methods_beside_data_free_ones():
    from starmerge.report.costs import cost_cells, render_costs

    results = {
        "rows": [{"name": "base", "scores": {}}, {"name": "individual", "scores": {}},
                 {"name": "star", "normalized": 91.25}, {"name": "regmean", "normalized": 95.0},
                 {"name": "mats", "normalized": None}],
        "data_used": {"star": {"data": "none"},
                      "regmean": {"data": "32 training items per task", "split": "train",
                                  "n": 32, "kinds": ["gram_in"]},
                      "mats": {"data": "32 training items per task", "split": "train", "n": 32,
                               "kinds": ["gram_in"], "seconds": 4.25, "peak_bytes": 3 * 2**20}},
        "timing": {"merge_s": {"star": 0.5, "regmean": 1.25, "mats": 3.0},
                   "stats_s": {"gram_in": 12.5}, "stats_peak_bytes": {"gram_in": 10 * 2**20}},
    }  # fmt: skip
    lines = cost_cells(results)
    assert lines[1:] == [
        ["star", "none", "-", "-", "0.50", "91.2"],
        # an older file without the entries' recorded cost: this run's collection
        ["regmean", "32 train items (gram_in)", "12.5", "10", "1.25", "95.0"],
        ["mats", "32 train items (gram_in)", "4.2", "3", "3.00", "-"],
    ]
    text = render_costs(results).splitlines()
    assert text[0].startswith("Merge") and len(text) == 5  # header, rule, 3 merges
    assert render_costs({"rows": []}) == ""
