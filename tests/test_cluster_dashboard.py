"""The Dask dashboard of `--cluster local`: served (bokeh is a dependency), printed, on 127.0.0.1 only, gone after."""
import re
import urllib.error
import urllib.request

import psutil
import pytest

from matseg.cluster import cluster_client


def test_local_cluster_prints_a_dashboard_that_answers(capsys):
    with cluster_client("local:1", "cpu") as client:
        line = capsys.readouterr().out
        m = re.search(r"dashboard (http://127\.0\.0\.1:(\d+)/status)\b", line)
        assert m, line  # not "none (it needs bokeh ...)"
        url, port = m.group(1), int(m.group(2))
        assert url == client.dashboard_link
        with urllib.request.urlopen(url, timeout=60) as r:
            assert r.status == 200 and b"bokeh" in r.read().lower()  # the bokeh status page, not a bare route
        listening = {c.laddr.ip for c in psutil.Process().net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}, listening  # this host only, not 0.0.0.0
    with pytest.raises(urllib.error.URLError):  # the cluster (and its dashboard) stopped with the context
        urllib.request.urlopen(url, timeout=10)
