"""The admission gate: budgets of new series, the registry (file and learned), the per-site rate
ceiling and forgetting quiet series, checked against counts worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from portpulse.arrays import factorise
from portpulse.contract.errors import ConfigError
from portpulse.contract.settings import AdmissionSettings
from portpulse.ingest.admission import (
    Admission,
    MessageSites,
    RegistryChange,
    SiteIndex,
    decode_registry_record,
    encode_registry_record,
    load_registry_file,
)
from portpulse.ingest.records import SeriesCodes

T0 = 1_764_000_000.0 - 1_764_000_000.0 % 86_400 + 3_600  # 01:00 UTC: an hour and a day begin


def batch(keys: list[tuple[str, str, str]]) -> SeriesCodes:
    domain, domains = factorise([k[0] for k in keys])
    site, sites = factorise([k[1] for k in keys])
    sensor, sensors = factorise([k[2] for k in keys])
    return SeriesCodes(domain, domains, sensor, sensors, site, sites)


def settings(**kw: float | int | str) -> AdmissionSettings:
    base: dict[str, float | int | str] = {"site_rate_per_s": 0}
    return AdmissionSettings(**{**base, **kw})


def test_a_site_gets_its_hourly_budget_of_new_series_and_known_ones_always_pass() -> None:
    gate = Admission(settings(site_new_per_hour=1000, site_new_per_day=2500))
    rogue = [("air", "harfleur", f"rogue-{i}") for i in range(1500)]
    # every rogue id twice, interleaved with a second site that stays within its budget
    keys = rogue + rogue + [("air", "port-2000", f"air-{i}") for i in range(10)]
    verdict = gate.admit(batch(keys), T0)
    admitted = np.asarray(keys, dtype=object)[verdict.admitted]
    expected = {f"rogue-{i}" for i in range(1000)} | {f"air-{i}" for i in range(10)}
    assert {str(k[2]) for k in admitted} == expected
    assert int(verdict.admitted.sum()) == 2000 + 10
    reasons = {verdict.refusals[c - 1][0] for c in verdict.refusal[verdict.refusal > 0].tolist()}
    assert reasons == {"cardinality_limit"}
    assert "site harfleur has had 1000 new series this hour" in verdict.refusals[0][1]
    assert len(verdict.refusals) == 500  # one per refused series, not per reading
    assert gate.known_series == 1010
    # the same hour: known ones pass, new ones do not; the next hour: 1000 more
    again = gate.admit(batch([("air", "harfleur", "rogue-5"), ("air", "harfleur", "rogue-1200")]), T0 + 60)
    assert again.admitted.tolist() == [True, False]
    later = gate.admit(batch([("air", "harfleur", f"rogue-{i}") for i in range(1000, 2600)]), T0 + 3600)
    assert int(later.admitted.sum()) == 1000
    # the day's budget (2500) is spent after 500 of a third hour's
    third = gate.admit(batch([("air", "harfleur", f"new-{i}") for i in range(700)]), T0 + 7200)
    assert int(third.admitted.sum()) == 500
    assert "this day (admission.site_new_per_day)" in third.refusals[0][1]
    report = gate.report(T0 + 7200)
    assert report[0]["site"] == "harfleur" and report[0]["refused"] == {"cardinality_limit": 1000 + 1 + 600 + 200}
    assert report[0]["sample_ids"] == [f"new-{i}" for i in range(695, 700)]


def test_domain_and_total_budgets() -> None:
    gate = Admission(settings(domain_new_per_hour=300, site_new_per_hour=0, site_new_per_day=0))
    keys = [("crane", f"site-{i % 7}", f"c-{i}") for i in range(400)] + [("air", "harfleur", "a-1")]
    verdict = gate.admit(batch(keys), T0)
    assert int(verdict.admitted.sum()) == 301 and bool(verdict.admitted[-1])
    assert "domain crane has had 300 new series this hour" in verdict.refusals[0][1]
    total = Admission(settings(max_series=50, site_new_per_hour=0, domain_new_per_hour=0))
    verdict = total.admit(batch([("air", "s", f"a-{i}") for i in range(80)]), T0)
    assert int(verdict.admitted.sum()) == 50
    assert "50 series in all (admission.max_series)" in verdict.refusals[0][1]


def test_strict_registry_admits_only_its_series_and_learned_ones_are_not_charged(tmp_path: Path) -> None:
    allowed = {("air", "harfleur", "air-1"), ("air", "harfleur", "air-2")}
    registry = tmp_path / "sensors.csv"
    registry.write_text("domain,site,sensor_id\n" + "".join(f"{d},{s},{i}\n" for d, s, i in sorted(allowed)))
    strict = Admission(settings(registry="strict", registry_file=str(registry)), load_registry_file(registry))
    verdict = strict.admit(batch([("air", "harfleur", "air-1"), ("air", "harfleur", "air-3")]), T0)
    assert verdict.admitted.tolist() == [True, False]
    assert verdict.refusals == [("unknown_sensor", "air/harfleur/air-3 is not in the registry (strict mode)")]
    # strict with the series learned before (the registry topic): a frozen fleet, quiet or not
    frozen = Admission(settings(registry="strict"), known={("air", "harfleur", "old-1"): (T0 - 10**7, T0 - 10**7)})
    keys = [("air", "harfleur", "old-1"), ("air", "harfleur", "air-1")]
    assert frozen.admit(batch(keys), T0).admitted.tolist() == [True, False]
    # learn mode: the file's series and the series read back at start-up spend no budget
    known = {("air", "harfleur", f"old-{i}"): (T0 - 86_400, T0 - 60) for i in range(5)}
    learn = Admission(settings(site_new_per_hour=1), allowed, known)
    keys = [*sorted(allowed), *known, ("air", "harfleur", "new-1"), ("air", "harfleur", "new-2")]
    assert learn.admit(batch(keys), T0).admitted.tolist() == [True] * 8 + [False]


def test_a_flooding_site_is_rationed_per_message_and_the_others_are_not() -> None:
    gate = Admission(settings(site_rate_per_s=100, site_burst_s=2))  # buckets of 200 readings
    assert gate.rationing and not Admission(settings()).rationing
    harfleur, port, crane = "sensors/air/harfleur", "sensors/air/port-2000/p-1", "sensors/crane/harfleur"
    index = SiteIndex("sensors", max_topics=2)  # starts over on the second batch: codes change, buckets stay
    detail = "air/harfleur over 100 readings/s (admission.site_rate_per_s, burst 200)"

    def batch_of(topics: list[str]) -> MessageSites:  # harfleur's batches: 5 readings in 100 bytes
        return index.of(topics, [100 if t == harfleur else 10 for t in topics])

    # Nothing decoded yet: a message is charged 10 bytes per reading, 10 readings: 20 pass
    first = batch_of([harfleur] * 30 + [port] * 5 + ["elsewhere/x"])
    assert index.sites == [("air", "harfleur"), ("air", "port-2000"), None]
    assert gate.ration(first, T0) == {i: ("rate_limit", detail) for i in range(20, 30)}
    # they held 100 readings, not 200: the bucket gets 100 back and learns 20 bytes per reading
    gate.settle(first, dict.fromkeys(range(20, 30)), np.array([5] * 30 + [1] * 5 + [0]))
    # half a second later: 150 tokens, 5 a message: harfleur's first 30 messages pass in arrival
    # order; port-2000 and harfleur's cranes (another domain) pass
    second = batch_of([port] + [harfleur] * 20 + [crane] + [harfleur] * 20)
    refused = gate.ration(second, T0 + 0.5)
    assert refused == {i: ("rate_limit", detail) for i in range(32, 42)}
    gate.settle(second, refused, np.array([1] + [5] * 20 + [3] + [5] * 10 + [0] * 10))
    # one more second: 100 tokens, 20 messages
    assert sorted(gate.ration(batch_of([harfleur] * 25), T0 + 1.5)) == list(range(20, 25))
    report = gate.report(T0 + 1.5)
    assert [(r["domain"], r["site"], r["refused"]) for r in report] == [("air", "harfleur", {"rate_limit": 25})]


def test_series_are_marked_seen_once_a_second_at_their_latest_batch_and_never_later() -> None:
    gate = Admission(settings(quiet_after_s=3600))
    a, b = ("air", "harfleur", "a"), ("air", "harfleur", "b")
    gate.admit(batch([a, b]), T0)
    gate.take_changes()
    gate.admit(batch([a]), T0 + 600.2)  # over a second since the last marking: marked now
    assert gate.take_changes() == [RegistryChange(a, T0, T0 + 600.2)]
    gate.admit(batch([b]), T0 + 600.4)
    gate.admit(batch([b, a]), T0 + 600.5)  # both held until a second has passed
    assert gate.take_changes() == []
    gate.admit(batch([a]), T0 + 3600.4)  # a sweep: b is marked when it came, so it is not quiet
    assert gate.take_changes() == [RegistryChange(b, T0, T0 + 600.5), RegistryChange(a, T0, T0 + 3600.4)]
    assert gate.known_series == 2


def test_quiet_series_are_forgotten_with_a_tombstone_and_count_as_new_when_they_return() -> None:
    gate = Admission(settings(quiet_after_s=3600, site_new_per_hour=2))
    gate.admit(batch([("air", "harfleur", "a"), ("air", "harfleur", "b")]), T0)
    assert [c.key[2] for c in gate.take_changes()] == ["a", "b"]
    gate.admit(batch([("air", "harfleur", "b")]), T0 + 300)
    assert gate.take_changes() == []  # last seen is written at most every 10 minutes
    gate.admit(batch([("air", "harfleur", "b")]), T0 + 3700)
    assert gate.take_changes() == [RegistryChange(("air", "harfleur", "a"), T0, None),
                                   RegistryChange(("air", "harfleur", "b"), T0, T0 + 3700)]  # fmt: skip
    assert gate.known_series == 1
    # "a" returns in the next hour: new again, within that hour's budget
    assert gate.admit(batch([("air", "harfleur", "a")]), T0 + 3800).admitted.tolist() == [True]
    assert gate.take_changes() == [RegistryChange(("air", "harfleur", "a"), T0 + 3800, T0 + 3800)]
    assert gate.known_series == 2


def test_registry_records_round_trip_and_foreign_records_are_ignored() -> None:
    change = RegistryChange(("cell", "port-2000", "gw-7"), T0, T0 + 5)
    key, value = encode_registry_record(change)
    assert key == b"cell/port-2000/gw-7"
    assert decode_registry_record(key, value) == (("cell", "port-2000", "gw-7"), (T0, T0 + 5))
    gone = encode_registry_record(RegistryChange(change.key, T0, None))
    assert gone == (key, None) and decode_registry_record(*gone) == (change.key, None)
    assert decode_registry_record(b"not-ours", b"{}") is None
    assert decode_registry_record(key, b"{broken") is None


def test_registry_files_in_toml_and_their_errors(tmp_path: Path) -> None:
    toml = tmp_path / "sensors.toml"
    toml.write_text('[harfleur]\nair = ["air-1", "air-2"]\n[port-2000]\ncrane = ["sts-1"]\n')
    assert load_registry_file(toml) == {
        ("air", "harfleur", "air-1"), ("air", "harfleur", "air-2"), ("crane", "port-2000", "sts-1")
    }  # fmt: skip
    bad = tmp_path / "bad.toml"
    bad.write_text('[harfleur]\nair = ["has space"]\n')
    with pytest.raises(ConfigError, match="invalid id in air/harfleur/has space"):
        load_registry_file(bad)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("site,sensor\nx,y\n")
    with pytest.raises(ConfigError, match="header must name domain,site,sensor_id"):
        load_registry_file(wrong)
    with pytest.raises(ConfigError, match=r"must end in \.toml or \.csv"):
        load_registry_file(tmp_path / "sensors.json")


def test_a_restarted_bridge_charges_the_budgets_with_the_series_registered_this_hour_and_day() -> None:
    known = {("air", "harfleur", f"r-{i}"): (T0 + 60, T0 + 60) for i in range(800)}  # this hour
    known |= {("air", "harfleur", f"d-{i}"): (T0 - 1800, T0 - 1800) for i in range(150)}  # earlier today
    known |= {("air", "harfleur", f"y-{i}"): (T0 - 86_400, T0 - 3600) for i in range(900)}  # yesterday
    gate = Admission(settings(site_new_per_hour=1000, site_new_per_day=1100), known=known)
    keys = [("air", "harfleur", f"new-{i}") for i in range(500)] + list(known)
    verdict = gate.admit(batch(keys), T0 + 120)
    # 1000 - 800 this hour would leave 200, but the day has 1100 - 950 = 150 left
    assert int(verdict.admitted[:500].sum()) == 150 and verdict.admitted[500:].all()


def test_sensors_listing_per_site_and_per_sensor() -> None:
    from portpulse.app.sensors import sensor_rows
    from portpulse.app.tables import format_table

    seen = {("air", "harfleur", "a-1"): (T0 - 7200, T0 - 60), ("air", "harfleur", "a-2"): (T0 - 7200, T0 - 7000),
            ("crane", "port-2000", "sts-1"): (T0, T0)}  # fmt: skip
    allowed = frozenset({("air", "harfleur", "a-3")})
    per_site = sensor_rows(seen, allowed, T0)
    assert per_site == [
        {"domain": "air", "site": "harfleur", "sensors": 3, "seen_last_hour": 1, "never_seen": 1,
         "last_seen": "2025-11-24T00:59:00Z"},
        {"domain": "crane", "site": "port-2000", "sensors": 1, "seen_last_hour": 1, "never_seen": 0,
         "last_seen": "2025-11-24T01:00:00Z"},
    ]  # fmt: skip
    one = sensor_rows(seen, allowed, T0, site="harfleur")
    assert [(r["sensor_id"], r["last_seen"], r["in_registry_file"]) for r in one] == [
        ("a-1", "2025-11-24T00:59:00Z", False), ("a-2", "2025-11-23T23:03:20Z", False), ("a-3", "never", True)
    ]  # fmt: skip
    table = format_table(per_site, "table").splitlines()
    assert table[0].split() == ["domain", "site", "sensors", "seen_last_hour", "never_seen", "last_seen"]
    assert table[2].split() == ["crane", "port-2000", "1", "1", "0", "2025-11-24T01:00:00Z"]
    assert format_table([], "table", empty="no sensors registered yet") == "no sensors registered yet"
    assert format_table(per_site[1:], "csv").splitlines() == [
        "domain,site,sensors,seen_last_hour,never_seen,last_seen",
        "crane,port-2000,1,1,0,2025-11-24T01:00:00Z",
    ]
