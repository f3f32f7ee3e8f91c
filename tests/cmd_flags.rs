//! `flags get` and `flags watch` bodies against a real SQLite file.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rollbackd::appdb::settings::SettingsStore;
use rollbackd::cli::flags::{flags_get, flags_watch, GetFormat};
use rollbackd::flags::LiveFlagsOptions;

fn options() -> LiveFlagsOptions {
    LiveFlagsOptions {
        defaults: BTreeMap::from([("NEW_CHECKOUT".to_string(), "0".to_string())]),
        ..LiveFlagsOptions::default()
    }
}

/// A writer the test can read while `flags_watch` holds it.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn wait_for_lines(buffer: &SharedBuffer, n_lines: usize) -> Vec<String> {
    tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let lines = buffer.lines();
            if lines.len() >= n_lines {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("fewer than {n_lines} lines: {:?}", buffer.lines()))
}

/// `flags get` into two buffers: (has a value, stdout, stderr).
fn get(path: &std::path::Path, key: &str, format: GetFormat) -> (bool, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let has_value = flags_get(path, key, &options(), format, &mut out, &mut err).unwrap();
    (
        has_value,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn get_prints_the_value_alone_and_why_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let mut store = SettingsStore::open(&path).unwrap();
    store.write_once("NEW_CHECKOUT", "1").unwrap();

    let plain = GetFormat::default();
    let explain = GetFormat {
        explain: true,
        ..GetFormat::default()
    };
    assert_eq!(
        get(&path, "NEW_CHECKOUT", plain),
        (true, "1\n".into(), String::new())
    );

    store.write_once("DISABLE_NEW", "1").unwrap();
    assert_eq!(
        get(&path, "NEW_CHECKOUT", plain),
        (true, "0\n".into(), String::new())
    );
    assert_eq!(
        get(&path, "NEW_CHECKOUT", explain),
        (
            true,
            "0\n".into(),
            "NEW_CHECKOUT=0 (safe default: kill switch DISABLE_NEW=1 is ON; row value \"1\")\n"
                .into()
        )
    );
    // No value: nothing on stdout, why on stderr, and the caller exits 1.
    let (has_value, stdout, stderr) = get(&path, "OTHER", plain);
    assert!(!has_value);
    assert_eq!(stdout, "");
    assert!(stderr.starts_with("OTHER unset"), "{stderr}");

    let error = flags_get(
        &dir.path().join("absent.db"),
        "X",
        &options(),
        plain,
        &mut Vec::new(),
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(format!("{error:#}").contains("absent.db"), "{error:#}");
    assert!(!dir.path().join("absent.db").exists());
}

#[test]
fn get_json_says_where_the_value_comes_from() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let mut store = SettingsStore::open(&path).unwrap();
    store.write_once("NEW_CHECKOUT", "1").unwrap();
    let json = GetFormat {
        json: true,
        ..GetFormat::default()
    };
    let parse = |key: &str| {
        let (has_value, stdout, stderr) = get(&path, key, json);
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        (
            has_value,
            serde_json::from_str::<serde_json::Value>(&stdout).unwrap(),
            stderr,
        )
    };
    let (_, line, stderr) = parse("NEW_CHECKOUT");
    assert_eq!(stderr, "");
    assert_eq!(
        line,
        serde_json::json!({"key": "NEW_CHECKOUT", "value": "1", "source": "row", "row": "1", "killSwitch": false})
    );
    let (_, line, _) = parse("MISSING_WITH_NO_DEFAULT");
    assert_eq!(line["source"], "none");
    assert!(line["value"].is_null());
    store.write_once("DISABLE_NEW", "1").unwrap();
    let (has_value, line, _) = parse("NEW_CHECKOUT");
    assert!(has_value);
    assert_eq!(
        line,
        serde_json::json!({"key": "NEW_CHECKOUT", "value": "0", "source": "kill-switch", "row": "1", "killSwitch": true})
    );
    let dir2 = tempfile::tempdir().unwrap();
    let empty = dir2.path().join("empty.db");
    drop(SettingsStore::open(&empty).unwrap());
    let (has_value, stdout, _) = get(&empty, "NEW_CHECKOUT", json);
    assert!(has_value);
    let line: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(line["source"], "default");
    assert_eq!(line["value"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_the_initial_state_then_one_line_per_changed_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let mut store = SettingsStore::open(&path).unwrap();
    store.write_once("NEW_CHECKOUT", "1").unwrap();

    let buffer = SharedBuffer::default();
    let mut out = buffer.clone();
    let (stop_sender, stop_receiver) = tokio::sync::oneshot::channel::<()>();
    let watching = flags_watch(&path, options(), false, &mut out, async {
        let _ = stop_receiver.await;
    });
    let driving = async {
        let initial = wait_for_lines(&buffer, 2).await;
        assert!(initial[0].contains("watching"), "{initial:?}");
        assert!(initial[1].ends_with(" NEW_CHECKOUT=1"), "{initial:?}");

        tokio::task::block_in_place(|| store.write_once("DISABLE_NEW", "1").unwrap());
        let lines = wait_for_lines(&buffer, 3).await;
        assert!(
            lines[2]
                .ends_with(" DISABLE_NEW=1 (was unset) — kill switch ON: flags use safe defaults"),
            "{lines:?}"
        );
        tokio::task::block_in_place(|| store.write_once("NEW_CHECKOUT", "2").unwrap());
        let lines = wait_for_lines(&buffer, 4).await;
        assert!(
            lines[3].ends_with(" NEW_CHECKOUT=2 (was 1) — kill switch ON: effective 0"),
            "{lines:?}"
        );
        stop_sender.send(()).unwrap();
    };
    let (watched, ()) = tokio::join!(watching, driving);
    watched.unwrap();
    assert_eq!(buffer.lines().len(), 4, "{:?}", buffer.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_lines_parse_and_carry_the_kill_switch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let mut store = SettingsStore::open(&path).unwrap();
    store.write_once("NEW_CHECKOUT", "1").unwrap();

    let buffer = SharedBuffer::default();
    let mut out = buffer.clone();
    let (stop_sender, stop_receiver) = tokio::sync::oneshot::channel::<()>();
    let watching = flags_watch(&path, options(), true, &mut out, async {
        let _ = stop_receiver.await;
    });
    let driving = async {
        wait_for_lines(&buffer, 1).await;
        tokio::task::block_in_place(|| store.write_once("DISABLE_NEW", "1").unwrap());
        wait_for_lines(&buffer, 2).await;
        stop_sender.send(()).unwrap();
    };
    let (watched, ()) = tokio::join!(watching, driving);
    watched.unwrap();

    let lines: Vec<serde_json::Value> = buffer
        .lines()
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["key"], "NEW_CHECKOUT");
    assert_eq!(lines[0]["initial"], true);
    assert_eq!(lines[1]["key"], "DISABLE_NEW");
    assert_eq!(lines[1]["value"], "1");
    assert_eq!(lines[1]["previous"], serde_json::Value::Null);
    assert_eq!(lines[1]["killSwitch"], true);
}
