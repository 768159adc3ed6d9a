//! Generation through the whole runtime on the real stories260K model: the known greedy
//! text, seeded sampling, concurrent (batched) requests, and bad input of every kind.

mod common;

use common::*;
use llmos_device::DeviceId;
use llmos_inference::{FinishReason, InferenceError, Runtime, SamplingParams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_output_matches_the_models_known_text() {
    let dir = tempfile::tempdir().unwrap();
    let out = generate_once(
        config(dir.path(), &[DeviceId::cpu(0)]),
        "Once upon a time",
        params(0.0, 60),
    )
    .await;
    assert_eq!(out.error, None);
    assert!(
        out.text.starts_with(KNOWN_CONTINUATION),
        "got {:?}",
        out.text
    );
    assert_eq!(out.finish, Some(FinishReason::Length));
    assert_eq!(out.tokens.len(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible_and_differs_from_greedy() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::boot(config(dir.path(), &[DeviceId::cpu(0)]))
        .await
        .unwrap();
    let a = collect(
        runtime
            .submit("Once upon a time", params(0.8, 40))
            .await
            .unwrap(),
    )
    .await;
    let b = collect(
        runtime
            .submit("Once upon a time", params(0.8, 40))
            .await
            .unwrap(),
    )
    .await;
    let greedy = collect(
        runtime
            .submit("Once upon a time", params(0.0, 40))
            .await
            .unwrap(),
    )
    .await;
    runtime.shutdown("test").await;
    assert_eq!(a, b);
    assert_ne!(a.tokens, greedy.tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_batch_and_each_equals_its_solo_run() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = ["Once upon a time", "The cat", "Tom and Sue went"];
    let runtime = Runtime::boot(config(dir.path(), &[DeviceId::cpu(0)]))
        .await
        .unwrap();
    let mut solo = Vec::new();
    for prompt in prompts {
        solo.push(collect(runtime.submit(prompt, params(0.0, 30)).await.unwrap()).await);
    }
    let mut streams = Vec::new();
    for prompt in prompts {
        streams.push(runtime.submit(prompt, params(0.0, 30)).await.unwrap());
    }
    let mut together = Vec::new();
    for stream in streams {
        together.push(collect(stream).await);
    }
    runtime.shutdown("test").await;
    for (a, b) in solo.iter().zip(&together) {
        assert_eq!(a.text, b.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_text_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::boot(config(dir.path(), &[DeviceId::cpu(0)]))
        .await
        .unwrap();
    let stop = SamplingParams {
        stop: vec!["Lily".into()],
        ..params(0.0, 60)
    };
    let out = collect(runtime.submit("Once upon a time", stop).await.unwrap()).await;
    runtime.shutdown("test").await;
    assert_eq!(out.text, ", there was a little girl named ");
    assert_eq!(out.finish, Some(FinishReason::Stop));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_clear_errors_and_disturb_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::boot(config(dir.path(), &[DeviceId::cpu(0)]))
        .await
        .unwrap();
    let long_prompt = "Once upon a time there was a dog. ".repeat(200);
    let err = runtime
        .submit(&long_prompt, params(0.0, 5))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, InferenceError::PromptTooLong { context: 512, .. }),
        "{err}"
    );
    for (bad, field) in [
        (
            SamplingParams {
                temperature: -0.5,
                ..params(0.0, 5)
            },
            "temperature",
        ),
        (
            SamplingParams {
                top_p: 2.0,
                ..params(0.0, 5)
            },
            "top_p",
        ),
        (
            SamplingParams {
                max_tokens: 0,
                ..params(0.0, 5)
            },
            "max_tokens",
        ),
    ] {
        let err = runtime.submit("Hi", bad).await.err().unwrap();
        assert!(err.to_string().contains(field), "{err}");
    }
    let err = runtime.submit("", params(0.0, 5)).await.err().unwrap();
    assert!(matches!(err, InferenceError::EmptyPrompt), "{err}");
    // The runtime still serves.
    let out = collect(
        runtime
            .submit("Once upon a time", params(0.0, 20))
            .await
            .unwrap(),
    )
    .await;
    runtime.shutdown("test").await;
    assert!(
        KNOWN_CONTINUATION.starts_with(&out.text)
            || out.text.starts_with(&KNOWN_CONTINUATION[..20])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_model_files_fail_the_boot_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let mut cfg = config(dir.path(), &[DeviceId::cpu(0)]);
    cfg.model = missing.clone();
    let err = Runtime::boot(cfg).await.err().unwrap().to_string();
    assert!(err.contains("nope.gguf"), "{err}");

    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(stories260k()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let mut cfg = config(dir.path(), &[DeviceId::cpu(0)]);
    cfg.model = truncated;
    let err = Runtime::boot(cfg).await.err().unwrap().to_string();
    assert!(err.contains("truncated.gguf"), "{err}");

    let cuda = config(dir.path(), &[DeviceId::cuda(0)]);
    if !cfg!(feature = "cuda") {
        let err = Runtime::boot(cuda).await.err().unwrap().to_string();
        assert!(err.contains("built without CUDA"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_too_small_for_a_request_refuses_it_without_disturbing_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &[DeviceId::cpu(0)]);
    // stories260K: 5 layers × 2 × 16 positions × 4 heads × 8 dims × 4 bytes = 20 KiB a
    // block; 8 blocks hold 128 positions.
    cfg.kv_budget_bytes = 8 * 20 * 1024;
    let runtime = Runtime::boot(cfg).await.unwrap();
    let err = runtime
        .submit("Once upon a time", params(0.0, 300))
        .await
        .err()
        .expect("needs more KV than the pool has");
    assert!(
        matches!(err, InferenceError::TooLarge { capacity: 128, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("KV"), "{err}");
    let out = collect(
        runtime
            .submit("Once upon a time", params(0.0, 60))
            .await
            .unwrap(),
    )
    .await;
    runtime.shutdown("test").await;
    assert!(out.text.starts_with(KNOWN_CONTINUATION), "{:?}", out.text);
}
