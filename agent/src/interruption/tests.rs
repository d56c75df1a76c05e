use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::cloud::{Cloud, Metadata};
use super::http::Endpoint;
use super::mock::MockMetadata;

fn endpoint(mock: &MockMetadata) -> Endpoint {
    Endpoint::parse(&mock.addr().to_string()).unwrap()
}

/// A deadline with whole seconds (RFC 3339 and RFC 1123 carry no more).
fn deadline_in(secs: u64) -> SystemTime {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    UNIX_EPOCH + Duration::from_secs(now + secs)
}

#[tokio::test]
async fn aws_reads_the_instance_action_with_an_imdsv2_token() {
    let mock = MockMetadata::start().await.unwrap();
    let mut aws = Metadata::new(Cloud::Aws, endpoint(&mock), Duration::from_secs(5));
    assert_eq!(aws.poll(SystemTime::now()).await.unwrap(), None);
    assert_eq!(mock.tokens_issued(), 1, "one token, reused for both paths");
    let deadline = deadline_in(120);
    mock.announce("terminate", deadline);
    let notice = aws.poll(SystemTime::now()).await.unwrap().unwrap();
    assert_eq!(
        (notice.source, notice.action.as_str()),
        ("aws", "terminate")
    );
    assert_eq!(notice.deadline, deadline);
    assert!(notice.reclaims());
    assert!(notice.detail.contains("\"action\": \"terminate\""));
    assert_eq!(mock.tokens_issued(), 1);
}

#[tokio::test]
async fn aws_rebalance_is_a_recommendation() {
    let mock = MockMetadata::start().await.unwrap();
    let mut aws = Metadata::new(Cloud::Aws, endpoint(&mock), Duration::from_secs(5));
    mock.announce("rebalance", deadline_in(120));
    let notice = aws.poll(SystemTime::now()).await.unwrap().unwrap();
    assert_eq!(notice.action, "rebalance");
    assert!(!notice.reclaims());
}

#[tokio::test]
async fn gcp_long_polls_until_preempted() {
    let mock = MockMetadata::start().await.unwrap();
    let mut gcp = Metadata::new(Cloud::Gcp, endpoint(&mock), Duration::from_secs(5));
    assert!(gcp.long_polls());
    // The first call answers at once; the next waits on the server.
    assert_eq!(gcp.poll(SystemTime::now()).await.unwrap(), None);
    let waiting = tokio::spawn(async move { gcp.poll(SystemTime::now()).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the poll returned without a change");
    mock.announce("preempt", deadline_in(30));
    let notice = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((notice.source, notice.action.as_str()), ("gcp", "preempt"));
    let left = notice.deadline.duration_since(SystemTime::now()).unwrap();
    assert!(
        left <= Duration::from_secs(30) && left > Duration::from_secs(20),
        "{left:?}"
    );
}

#[tokio::test]
async fn azure_reads_preempt_events_and_their_not_before() {
    let mock = MockMetadata::start().await.unwrap();
    let mut azure = Metadata::new(Cloud::Azure, endpoint(&mock), Duration::from_secs(5));
    assert_eq!(azure.poll(SystemTime::now()).await.unwrap(), None);
    let deadline = deadline_in(45);
    mock.announce("preempt", deadline);
    let notice = azure.poll(SystemTime::now()).await.unwrap().unwrap();
    assert_eq!(
        (notice.source, notice.action.as_str()),
        ("azure", "preempt")
    );
    assert_eq!(notice.deadline, deadline);
    assert!(notice.detail.contains("\"EventType\": \"Preempt\""));
}

#[tokio::test]
async fn an_unreachable_or_wrong_service_is_an_error_that_says_so() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut aws = Metadata::new(
        Cloud::Aws,
        Endpoint::parse(&addr.to_string()).unwrap(),
        Duration::from_secs(2),
    );
    let err = aws.poll(SystemTime::now()).await.unwrap_err();
    assert!(err.starts_with("cannot connect to 127.0.0.1:"), "{err}");
    assert!(
        Cloud::parse("oracle")
            .unwrap_err()
            .contains("use none, aws, gcp or azure")
    );
    assert!(Endpoint::parse("http://h/x").is_err());
    assert_eq!(
        Endpoint::parse("http://169.254.169.254").unwrap(),
        Endpoint {
            host: "169.254.169.254".into(),
            port: 80
        }
    );
}
