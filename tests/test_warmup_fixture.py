import json


def test_warmup_fixture_is_complete(warmup_work):
    m = json.loads((warmup_work / "02_warmup" / "manifest.json").read_text())
    assert m["complete"] and m["args"]["backbone"] == "resnet18"
    assert (warmup_work / "02_warmup" / "model.pt").exists()
