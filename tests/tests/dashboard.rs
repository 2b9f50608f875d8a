//! The web dashboard end to end: a federation of real processes, a short
//! job, `confide dashboard`, and headless Chromium (Debian's `chromium`
//! and `chromium-driver`) reading the pages. The job page is opened before
//! any party is connected, so the finished rounds and curves it ends up
//! showing came through the live updates, not a reload.

use std::io::{Read, Write};

use confide_tests::webdriver::{Browser, browser};
use confide_tests::{Dashboard, Federation, bin_dir, job_spec, repo_root};

/// `GET path` with `Host: host` and the browser's cookie: the status line,
/// headers and body.
fn get(dash: &Dashboard, host: &str, path: &str) -> (String, String) {
    get_with(dash, host, path, "")
}

/// [`get`] with further header lines (each ending in CRLF).
fn get_with(dash: &Dashboard, host: &str, path: &str, headers: &str) -> (String, String) {
    request(&dash.addr, host, path, &format!("{}{headers}", dash.cookie()))
}

/// `GET path` with exactly the given header lines besides `Host`.
fn request(addr: &str, host: &str, path: &str, headers: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the dashboard");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_owned(), body.to_owned())
}

#[test]
fn the_job_page_follows_a_job_live_in_a_real_browser() {
    let names = ["hospital-a", "hospital-b", "hospital-c"];
    let mut fed = Federation::new(&names, &repo_root().join("examples/data/breast_cancer.csv"), true, "5,3,2");
    fed.start_coordinator();
    let dash = fed.start_dashboard();
    let rounds = 4;
    let spec = job_spec(&fed.names, 3, rounds, "kind = \"logistic_regression\"\nclasses = 2", "seed = 5")
        + "[evaluation]\nevery = 1\n";
    let id = fed.submit("job.toml", &spec);

    // Plain HTTP first (no browser needed): pages render, carry a script
    // policy, and another Host (DNS rebinding) is refused.
    let (head, body) = get(&dash, &dash.addr, &format!("/jobs/{id}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    assert!(head.to_ascii_lowercase().contains("content-security-policy: default-src 'self'; script-src 'self'"));
    assert!(body.contains("<b id=\"rounds\">0 / 4</b>"), "{body}");
    let (head, _) = get(&dash, "attacker.example:80", &format!("/jobs/{id}"));
    assert!(head.starts_with("HTTP/1.1 421"), "{head}");
    // A page of another site (what a browser says of it) opens no event
    // stream, which would hold a watch on the coordinator; a link followed
    // from one still shows a page.
    for headers in [
        "Origin: http://attacker.example\r\nSec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: cors\r\n",
        "Origin: null\r\n",
        "Sec-Fetch-Site: same-site\r\nSec-Fetch-Mode: no-cors\r\n",
        "Sec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: navigate\r\n",
    ] {
        let (head, _) = get_with(&dash, &dash.addr, &format!("/jobs/{id}/events"), headers);
        assert!(head.starts_with("HTTP/1.1 403"), "{headers}: {head}");
    }
    // Only with this run's token: none, another, or one in another
    // dashboard's cookie is refused (401) and names no token; the printed
    // address sets the cookie and shows the page without the token.
    let page = format!("/jobs/{id}");
    let cookie_of = |token: &str| dash.cookie().replace("Cookie: ", "Cookie: other=1; ").replace(&dash.token, token);
    let wrong = "0".repeat(64);
    let port = dash.addr.rsplit(':').next().unwrap();
    for headers in [
        String::new(),
        cookie_of(&wrong),
        cookie_of(&dash.token[..63]),
        format!("Cookie: confide_dashboard_1{port}={}\r\n", dash.token),
    ] {
        let (head, body) = request(&dash.addr, &dash.addr, &page, &headers);
        assert!(head.starts_with("HTTP/1.1 401") && !body.contains(&dash.token), "{headers}: {head}\n{body}");
        assert!(body.contains("open the address"), "{body}");
    }
    let (head, _) = request(&dash.addr, &dash.addr, &format!("{page}?token={wrong}"), "");
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let (head, _) = request(&dash.addr, &dash.addr, &format!("{page}?token={}", dash.token), "");
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 303") && lower.contains(&format!("location: {page}\r\n")), "{head}");
    let set = format!("set-cookie: confide_dashboard_{port}={}; httponly; samesite=strict; path=/", dash.token);
    assert!(lower.contains(&set), "{head}");
    assert!(get(&dash, &dash.addr, &page).0.starts_with("HTTP/1.1 200"));
    // Never to another site: `//host` keeps one slash.
    let (head, _) = request(&dash.addr, &dash.addr, &format!("//evil.example?token={}", dash.token), "");
    assert!(head.to_ascii_lowercase().contains("location: /evil.example\r\n"), "{head}");
    let link = "Sec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: navigate\r\n";
    assert!(get_with(&dash, &dash.addr, &format!("/jobs/{id}"), link).0.starts_with("HTTP/1.1 200"));
    let (head, body) = get(&dash, &dash.addr, "/jobs/..%2Fetc");
    assert!(head.starts_with("HTTP/1.1 400") && body.contains("not a job id"), "{head}\n{body}");
    let (head, body) = get(&dash, &dash.addr, "/jobs/no-such-job");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}\n{body}");

    let Some((chromium, driver)) = browser() else {
        fed.start_parties();
        fed.wait_done(&id, 120);
        return;
    };
    let b = Browser::start(&chromium, &driver, &fed.path("logs/chromedriver.log"));
    // The printed address first (it sets the token's cookie), then the
    // job page the way a link reaches it.
    b.goto(&format!("http://{}/?token={}", dash.addr, dash.token));
    b.goto(&format!("http://{}/jobs/{id}", dash.addr));
    assert_eq!(b.eval("return document.getElementById('rounds').textContent"), "0 / 4");
    // A marker a reload would wipe.
    b.eval("window.notReloaded = true; return true");

    fed.start_parties();
    b.wait_until(
        120,
        "return document.getElementById('job-body').dataset.state === 'succeeded'",
        "return document.getElementById('job-body').outerHTML.slice(0, 2000)",
    );
    let st = fed.status(&id);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    // The server ends the stream after the job: the page hears `end`.
    b.wait_until(30, "return (window.confideDashboard || {}).ended === true", "return window.confideDashboard");
    let seen = b.eval(
        "const d = window.confideDashboard || {};
         const pts = s => [...document.querySelectorAll(s + ' polyline')].map(p => p.dataset.series + ':' + p.dataset.points);
         return {
           notReloaded: window.notReloaded === true,
           loadedRounds: d.loadedRounds, updates: d.updates, ended: d.ended,
           rounds: document.getElementById('rounds').textContent,
           rows: document.querySelectorAll('#rounds-table tbody tr').length,
           loss: pts('#chart-loss'), scores: pts('#chart-scores'), stages: pts('#chart-stages'),
           parties: [...document.querySelectorAll('#job-parties tbody tr')].map(r => r.cells[0].textContent + '=' + r.cells[1].textContent),
         };",
    );
    assert_eq!(seen["notReloaded"], true, "{seen:#}");
    assert_eq!(seen["loadedRounds"], 0, "{seen:#}");
    assert!(seen["updates"].as_u64() >= Some(2), "{seen:#}");
    assert_eq!(seen["ended"], true, "{seen:#}");
    assert_eq!(seen["rounds"], "4 / 4", "{seen:#}");
    assert_eq!(seen["rows"], rounds, "{seen:#}");
    let has = |chart: &str, series: &str| {
        seen[chart].as_array().is_some_and(|a| a.iter().any(|s| s == format!("{series}:{rounds}").as_str()))
    };
    assert!(has("loss", "train_loss"), "a training-loss curve over every round: {seen:#}");
    assert!(has("scores", "accuracy"), "an accuracy curve over every round: {seen:#}");
    assert!(has("stages", "fit"), "the fit stage's timings over every round: {seen:#}");
    for n in names {
        assert!(seen["parties"].as_array().unwrap().iter().any(|p| p == format!("{n}=accepted").as_str()), "{seen:#}");
    }
    let shots = bin_dir().parent().expect("target").join("dashboard");
    b.screenshot(&shots.join("job.png"));

    // The overview: every party connected, its certificate's expiry and
    // advertised policy; the job listed with its state.
    b.goto(&format!("http://{}/", dash.addr));
    let overview = b.eval(
        "return {
           parties: [...document.querySelectorAll('#parties tbody tr')].map(r => [r.dataset.party, r.cells[1].textContent, r.cells[2].textContent, r.cells[4].textContent]),
           job: [...document.querySelectorAll('#jobs tbody tr')].map(r => r.cells[0].textContent + ' ' + r.cells[3].textContent + ' ' + r.cells[4].textContent),
         };",
    );
    let rows = overview["parties"].as_array().expect("parties");
    assert_eq!(rows.len(), 3, "{overview:#}");
    for r in rows {
        assert_eq!(r[1], "connected", "{overview:#}");
        assert!(r[2].as_str().is_some_and(|e| e.contains("days")), "certificate expiry: {overview:#}");
        assert!(r[3].as_str().is_some_and(|p| p.contains("aggregation: none")), "advertised policy: {overview:#}");
    }
    assert_eq!(overview["job"][0], format!("{id} succeeded 4 / 4"), "{overview:#}");
    b.screenshot(&shots.join("overview.png"));
    b.goto(&format!("http://{}/models", dash.addr));
    assert!(
        b.eval("return document.querySelectorAll('#models tbody tr').length").as_u64() >= Some(1),
        "kept model versions listed"
    );
}
