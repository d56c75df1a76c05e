//! Finding the leader among several controllers (docs/ha.md): the facts a
//! standby's answer and its clients (CLI, agent) share.

/// The metadata key of a standby controller's `UNAVAILABLE` answer that
/// holds the leader's URL.
pub const LEADER_METADATA: &str = "gpufleet-leader";

/// Most controllers one client may be given.
pub const MAX_CONTROLLERS: usize = 16;

/// The controller URLs of a comma-separated list (`--controller a,b,c`),
/// trimmed, empty entries dropped.
pub fn controller_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_string)
        .collect()
}

/// The next controller to try after `current` failed: the named leader
/// when a standby named one, else the entry after `current` in `list`
/// (wrapping), else the first.
pub fn next_controller(list: &[String], current: &str, leader_hint: Option<&str>) -> String {
    if let Some(leader) = leader_hint.filter(|l| !l.is_empty()) {
        return leader.to_string();
    }
    match list.iter().position(|url| url == current) {
        Some(i) => list[(i + 1) % list.len()].clone(),
        None => list.first().cloned().unwrap_or_else(|| current.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_wins_then_the_list_rotates() {
        let list = controller_list(" http://a:1, http://b:1 ,,http://c:1");
        assert_eq!(list, ["http://a:1", "http://b:1", "http://c:1"]);
        assert_eq!(next_controller(&list, "http://a:1", None), "http://b:1");
        assert_eq!(next_controller(&list, "http://c:1", None), "http://a:1");
        assert_eq!(
            next_controller(&list, "http://a:1", Some("http://c:1")),
            "http://c:1"
        );
        // A leader not in the list (its advertise URL) is left for the first.
        assert_eq!(next_controller(&list, "http://z:1", None), "http://a:1");
    }
}
