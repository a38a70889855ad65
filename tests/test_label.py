"""`dpokit label`: the labeling database (claims, overlap, votes stored once, undo), agreement and the exports
as dpokit reads them, the JSON API on a real server (token, escaping contract, errors), 20 annotators at
once, the human judge's scores, and the command's one-line errors."""

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from dpokit import labels
from dpokit.cli import main
from dpokit.data import load_examples
from dpokit.labels.judge import human_scores
from dpokit.labels.results import agreement, outcome
from dpokit.labels.server import Server
from dpokit.labels.store import Store, VoteRefused, pairs_of


def comparisons_file(path, n_prompts=4, k=2):
    rows = [
        {"prompt": f"prompt {i}", "completions": [f"answer {i}.{j}" for j in range(k)]}
        for i in range(n_prompts)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_of_a_prompt_leave_identical_texts_out():
    items, identical = pairs_of("p", ["x", "y", "x"], {"round": 1})
    assert [(a, b, s["i"], s["j"]) for _, a, b, s in items] == [("x", "y", 0, 1), ("y", "x", 1, 2)]
    assert identical == 1 and all(s["round"] == 1 for *_, s in items)


def test_overlap_claims_votes_once_and_undo(tmp_path):
    store = Store(tmp_path, create=True)
    store.set_setting("overlap", 2)
    assert store.add([("p", "a1", "b1", {}), ("q", "a2", "b2", {})]) == 2
    assert store.add([("p", "a1", "b1", {})]) == 0  # the same comparison is one
    first = store.next_for("ann")
    assert first[0].id == 1 and store.next_for("ann") == first  # shown again until answered, same sides
    assert store.next_for("bob")[0].id == 1  # overlap 2: a second annotator gets it too
    assert store.next_for("cat")[0].id == 2  # two live claims fill comparison 1
    with pytest.raises(VoteRefused, match="not the one shown"):
        store.vote("ann", 2, "a")
    assert store.vote("ann", 1, "b", "close call") is True
    assert store.vote("ann", 1, "b", "close call") is False  # a resent vote is stored once
    with pytest.raises(VoteRefused, match="undo it first"):
        store.vote("ann", 1, "a")
    assert len(store.votes()) == 1 and store.votes()[0]["comment"] == "close call"
    shown_next = store.next_for("ann")
    assert shown_next[0].id == 2
    assert store.undo("ann") == 1 and store.votes() == []
    again = store.next_for("ann")
    assert again[0].id == 1 and again[1] == first[1]  # back, on the sides it had
    assert store.undo("nobody") is None
    with pytest.raises(VoteRefused, match="expected one of"):
        store.vote("ann", 1, "better")
    assert store.vote("ann", 1, "left") is True  # the side as shown: the text on the left
    assert store.votes()[0]["choice"] == again[1] and store.vote("ann", 1, "left") is False


def test_a_new_connection_sees_every_committed_vote(tmp_path):
    """What a killed server leaves: another process opening the file finds each vote and each claim."""
    store = Store(tmp_path, create=True)
    store.add([("p", "x", "y", {}), ("q", "x", "z", {})])
    shown = store.next_for("ann")
    store.vote("ann", shown[0].id, "a")
    held = store.next_for("ann")
    fresh = Store(tmp_path)
    assert [v["choice"] for v in fresh.votes()] == ["a"]
    assert fresh.next_for("ann") == held
    assert fresh.path.with_name("labels.sqlite-wal").exists()  # WAL mode


def test_agreement_and_outcome_in_closed_form():
    votes = [
        {"comparison": 1, "annotator": "ann", "choice": "a"},
        {"comparison": 1, "annotator": "bob", "choice": "a"},
        {"comparison": 2, "annotator": "ann", "choice": "a"},
        {"comparison": 2, "annotator": "bob", "choice": "tie"},
        {"comparison": 2, "annotator": "cat", "choice": "tie"},
        {"comparison": 3, "annotator": "bob", "choice": "skip"},
    ]
    ag = agreement(votes)
    pairs = {tuple(p["annotators"]): (p["shared"], p["agreement"]) for p in ag["pairs"]}
    assert pairs == {("ann", "bob"): (2, 0.5), ("ann", "cat"): (1, 0.0), ("bob", "cat"): (1, 1.0)}
    assert ag["annotators"]["ann"] == {"shared": 3, "agreement": 1 / 3}
    assert ag["annotators"]["bob"] == {"shared": 3, "agreement": 2 / 3}
    assert outcome({"x": "a", "y": "a", "z": "b"}) == "a"
    assert outcome({"x": "a", "y": "b"}) == "no_majority"
    assert outcome({"x": "both_bad"}) == "both_bad" and outcome({}) == "unlabeled"


def labelled(tmp_path):
    """4 comparisons, overlap 2: ann and bob agree on 1 (a) and 3 (b), split on 2, both call 4 a tie."""
    folder = tmp_path / "labels"
    labels.prepare(folder, data=comparisons_file(tmp_path / "c.jsonl"), overlap=2)
    store = Store(folder)
    plan = {"ann": {1: "a", 2: "a", 3: "b", 4: "tie"}, "bob": {1: "a", 2: "b", 3: "b", 4: "tie"}}
    for who, choices in plan.items():
        while (shown := store.next_for(who)) is not None:
            store.vote(who, shown[0].id, choices[shown[0].id])
    return folder, store


def test_exports_read_back_as_dpokit_data(tmp_path, capsys):
    folder, store = labelled(tmp_path)
    counts = labels.export(folder, tmp_path / "pairs.jsonl")
    assert counts == {"written": 2, "a": 1, "b": 1, "tie": 1, "both_bad": 0, "no_majority": 1, "unlabeled": 0}
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert pairs == [
        {"prompt": "prompt 0", "chosen": "answer 0.0", "rejected": "answer 0.1"},
        {"prompt": "prompt 2", "chosen": "answer 2.1", "rejected": "answer 2.0"},
    ]
    labels.export(folder, tmp_path / "votes.jsonl", "votes")
    examples, stats = load_examples(str(tmp_path / "votes.jsonl"))
    kept = {e.prompt[0]["content"]: e for e in examples}
    ties = {p for p, e in kept.items() if e.meta.get("tie")}
    assert ties == {
        "prompt 1",
        "prompt 3",
    }  # the split and the tie carry no preference: dropped before training
    assert kept["prompt 2"].meta["votes"] == [2, 2] and kept["prompt 2"].meta["annotators"] == ["ann", "bob"]
    assert main(["data", "check", str(tmp_path / "votes.jsonl"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["annotators"]["pairs"] == [{"annotators": ["ann", "bob"], "shared": 4, "agreement": 0.75}]
    assert report["ties"] == 2
    assert (
        main(
            [
                "data",
                "filter",
                str(tmp_path / "votes.jsonl"),
                "--out",
                str(tmp_path / "f.jsonl"),
                "--min-agreement",
                "1",
            ]
        )
        == 0
    )


def test_stats_and_cli_export(tmp_path, capsys):
    folder, _ = labelled(tmp_path)
    s = labels.stats(folder)
    assert (s["comparisons"], s["complete"], s["votes"]) == (4, 4, 8)
    assert s["annotators"]["bob"] == {"votes": 4, "a": 1, "b": 2, "tie": 1}
    assert main(["label", "export", str(folder), str(tmp_path / "p.jsonl")]) == 0
    assert "2 records -> " in capsys.readouterr().out
    assert main(["label", "stats", str(folder)]) == 0
    assert "ann & bob: agree on 0.750 of 4 shared" in capsys.readouterr().out


def test_human_judge_scores_in_closed_form(tmp_path):
    store = Store(tmp_path, create=True)
    samples = [{"prompt": "p", "completions": ["x", "y", "z"]}, {"prompt": "q", "completions": ["u", "v"]}]
    from dpokit.labels.judge import add_round

    assert add_round(store, 1, samples) == 4
    store.set_setting("overlap", 2)
    want = {
        "ann": {(0, 1): "a", (0, 2): "tie", (1, 2): "both_bad"},
        "bob": {(0, 1): "b", (0, 2): "a", (1, 2): "skip"},
    }
    for who, choice in want.items():
        while (shown := store.next_for(who)) is not None:
            src = shown[0].source
            store.vote(
                who, shown[0].id, choice.get((src["i"], src["j"]), "skip") if src["prompt"] == 0 else "skip"
            )
    # x: (0,1) votes a, b -> 0.5; (0,2) tie, a -> 0.75; y: 0.5 and (1,2) both_bad -> 0; z: 0.25 and 0
    assert human_scores(store, 1, samples) == [[0.625, 0.25, 0.125], [0.5, 0.5]]


def http(url, body=None, token=None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Dpokit-Token", token)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture
def served(tmp_path):
    labels.prepare(tmp_path / "labels", data=comparisons_file(tmp_path / "c.jsonl", 50, 2), overlap=20)
    server = Server(Store(tmp_path / "labels"), port=0).start()
    yield server, tmp_path / "labels"
    server.stop()


def test_api_votes_and_errors(served):
    server, _ = served
    base = server.url
    shown = http(base + "api/next?annotator=ann")
    c = shown["comparison"]
    assert shown["progress"] == {"done": 0, "left": 50} and {c["left"], c["right"]} == {
        "answer 0.0",
        "answer 0.1",
    }
    after = http(
        base + "api/vote", {"annotator": "ann", "comparison": c["id"], "choice": "left", "comment": ""}
    )
    assert after["stored"] is True and after["comparison"]["id"] == 2
    again = http(
        base + "api/vote", {"annotator": "ann", "comparison": c["id"], "choice": "left", "comment": ""}
    )
    assert again["stored"] is False  # a resent vote
    vote = http(base + "api/stats")["votes"]
    assert vote == 1
    for bad, status in (
        ({"annotator": "ann", "comparison": 7, "choice": "left"}, 409),
        ({"annotator": "ann", "comparison": 2, "choice": "maybe"}, 400),
        ({"annotator": "", "comparison": 2, "choice": "left"}, 400),
    ):
        with pytest.raises(urllib.error.HTTPError) as err:
            http(base + "api/vote", bad)
        assert err.value.code == status and "error" in json.loads(err.value.read())
    form = urllib.request.Request(
        base + "api/vote", data=b'{"annotator": "ann"}', headers={"Content-Type": "text/plain"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:  # what another site's page could send unasked
        urllib.request.urlopen(form, timeout=30)
    assert err.value.code == 400
    rebound = urllib.request.Request(base + "api/stats", headers={"Host": f"evil.example:{server.port}"})
    with pytest.raises(urllib.error.HTTPError) as err:  # DNS rebinding: another name for this address
        urllib.request.urlopen(rebound, timeout=30)
    assert err.value.code == 400
    page = urllib.request.urlopen(base, timeout=30).read().decode()
    assert "answer 0.0" not in page and "textContent" in page  # texts reach the page as JSON only


def test_token_is_needed_beyond_loopback_and_checked(tmp_path):
    from dpokit.errors import UsageError

    store = Store(tmp_path, create=True)
    with pytest.raises(UsageError, match="needs an access token"):
        Server(store, host="0.0.0.0", port=0)
    server = Server(store, port=0, token="s3cret").start()
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            http(f"http://127.0.0.1:{server.port}/api/stats")
        assert err.value.code == 401
        with pytest.raises(urllib.error.HTTPError):
            http(f"http://127.0.0.1:{server.port}/api/stats", token="wrong")
        assert http(f"http://127.0.0.1:{server.port}/api/stats", token="s3cret")["comparisons"] == 0
        assert server.url.endswith("/?token=s3cret")
        assert urllib.request.urlopen(server.url, timeout=30).status == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_twenty_annotators_cast_a_thousand_votes(served):
    """50 comparisons x overlap 20 = 1,000 votes from 20 concurrent annotators, each vote sent twice (a retry):
    every vote stored once, none lost, the overlap never exceeded."""
    server, folder = served
    base = server.url

    def annotate(who: str) -> int:
        shown, sent = http(f"{base}api/next?annotator={who}"), 0
        while shown["comparison"] is not None:
            body = {
                "annotator": who,
                "comparison": shown["comparison"]["id"],
                "choice": "left",
                "comment": "",
            }
            shown = http(base + "api/vote", body)
            assert http(base + "api/vote", body)["stored"] is False
            sent += 1
        return sent

    with ThreadPoolExecutor(20) as pool:
        sent = list(pool.map(annotate, [f"annotator-{i}" for i in range(20)]))
    votes = Store(folder).votes()
    assert sum(sent) == len(votes) == 1000
    assert len({(v["comparison"], v["annotator"]) for v in votes}) == 1000
    per = {}
    for v in votes:
        per[v["comparison"]] = per.get(v["comparison"], 0) + 1
    assert set(per.values()) == {20} and len(per) == 50


def test_label_command_errors_are_one_line_before_anything_is_written(tmp_path, capsys):
    folder = tmp_path / "labels"
    cases = [
        (["label", "serve", str(folder), "--host", "0.0.0.0", "--data", "x.jsonl"], "needs an access token"),
        (
            ["label", "serve", str(folder), "--data", str(tmp_path / "missing.jsonl"), "--port", "0"],
            "no such file",
        ),
        (["label", "serve", str(folder), "--port", "0"], "holds no labels"),
        (["label", "export", str(folder), str(tmp_path / "o.jsonl")], "holds no labels"),
        (["label", "serve", str(folder), "--model", "m", "--port", "0"], "give --prompts"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completions": ["only one"]}\n')
    cases.append(
        (["label", "serve", str(folder), "--data", str(bad), "--port", "0"], "bad.jsonl:line 1: completions:")
    )
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not folder.exists()
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert (
            main(
                [
                    "label",
                    "serve",
                    str(folder),
                    "--data",
                    str(comparisons_file(tmp_path / "c.jsonl")),
                    "--port",
                    str(port),
                ]
            )
            == 2
        )
    assert "cannot listen there" in capsys.readouterr().err and not folder.exists()
