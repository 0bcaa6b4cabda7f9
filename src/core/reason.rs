//! Why an image is or is not accepted: one list, shared by the input checks (`preprocess`), the verdict and
//! every adapter.

/// Why an image is not classified, or not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Accepted,
    LowConfidence,
    MostlyDark,
    MostlyBright,
    LowContrast,
    Undecodable,
    WrongSize,
    TooLarge,
    OutOfDistribution,
    /// Once the background is trimmed, what is left of an upload is a dot or a line.
    TinyObject,
}

impl Reason {
    /// Every reason, in declaration order (`reason as usize` indexes it).
    pub const ALL: [Reason; 10] = [
        Reason::Accepted,
        Reason::LowConfidence,
        Reason::MostlyDark,
        Reason::MostlyBright,
        Reason::LowContrast,
        Reason::Undecodable,
        Reason::WrongSize,
        Reason::TooLarge,
        Reason::OutOfDistribution,
        Reason::TinyObject,
    ];

    /// Stable snake_case label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Accepted => "accepted",
            Reason::LowConfidence => "low_confidence",
            Reason::MostlyDark => "mostly_dark",
            Reason::MostlyBright => "mostly_bright",
            Reason::LowContrast => "low_contrast",
            Reason::Undecodable => "undecodable",
            Reason::WrongSize => "wrong_size",
            Reason::TooLarge => "too_large",
            Reason::OutOfDistribution => "out_of_distribution",
            Reason::TinyObject => "tiny_object",
        }
    }
}

impl Reason {
    /// The reason's name on the wire where a protocol has no enum for it (the Open Inference Protocol's
    /// `reason` output): `fashion_mnist.v1`'s enum value without its `REASON_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Accepted => "ACCEPTED",
            Reason::LowConfidence => "LOW_CONFIDENCE",
            Reason::MostlyDark => "MOSTLY_DARK",
            Reason::MostlyBright => "MOSTLY_BRIGHT",
            Reason::LowContrast => "LOW_CONTRAST",
            Reason::Undecodable => "UNDECODABLE",
            Reason::WrongSize => "WRONG_SIZE",
            Reason::TooLarge => "TOO_LARGE",
            Reason::OutOfDistribution => "OUT_OF_DISTRIBUTION",
            Reason::TinyObject => "TINY_OBJECT",
        }
    }
}
